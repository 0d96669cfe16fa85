"""What billing's lifespan builds and its routes use (typed, one object on `app.state.runtime`)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from services.billing.catalog import Catalog
from services.billing.checkout import CheckoutService
from services.billing.config import BillingSettings
from services.billing.webhooks import WebhookReceiver
from shared.outbox import OutboxRelay


@dataclass
class BillingRuntime:
    settings: BillingSettings
    catalog: Catalog
    engine: AsyncEngine
    relay: OutboxRelay
    checkout: CheckoutService
    webhooks: WebhookReceiver
