"""Billing's composition root: the long-lived objects (database engine, outbox relay, Stripe client,
checkout and webhook services) built from the settings, started and closed here. The app (`app.py`)
puts one `BillingRuntime` on `app.state.runtime` for its routes; the reconcile command
(`reconcile.py`) builds its own from the same parts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.billing.catalog import Catalog
from services.billing.checkout import CheckoutGateway, CheckoutService, LocalTestCheckout
from services.billing.config import BillingSettings
from services.billing.stripe_gateway import StripeGateway
from services.billing.webhooks import WebhookReceiver
from shared.broker import Topology
from shared.db import engine_for, migrate
from shared.outbox import OutboxRelay
from shared.web import ReadinessCheck

log = logging.getLogger("billing.runtime")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


async def migrate_if_asked(settings: BillingSettings) -> None:
    if settings.auto_migrate:
        await migrate(settings.database_url, MIGRATIONS_DIR)


def build_relay(settings: BillingSettings, engine: object) -> OutboxRelay:
    return OutboxRelay(
        engine,  # type: ignore[arg-type]
        broker_url=settings.rabbitmq_url,
        topology=Topology(settings.broker_namespace),
        table="outbox",
        connection_name="billing-outbox-relay",
        poll_interval=settings.outbox_poll_seconds,
        max_backoff=settings.outbox_max_backoff_seconds,
        # Purchases and refunds must reach credits' queue; until it exists they wait in the outbox.
        require_route=True,
    )


def stripe_gateway(settings: BillingSettings) -> StripeGateway | None:
    if settings.test_mode:
        return None
    assert settings.stripe_api_key
    return StripeGateway(settings.stripe_api_key, settings.stripe_api_base)


@dataclass
class BillingRuntime:
    settings: BillingSettings
    catalog: Catalog
    engine: AsyncEngine
    relay: OutboxRelay
    checkout: CheckoutService
    webhooks: WebhookReceiver

    @classmethod
    async def open(cls, settings: BillingSettings, catalog: Catalog) -> BillingRuntime:
        """Migrates the database when AUTO_MIGRATE asks for it, then builds the objects (nothing runs
        until `start`)."""
        await migrate_if_asked(settings)
        engine = engine_for(settings)
        relay = build_relay(settings, engine)
        gateway = stripe_gateway(settings)
        checkout_gateway: CheckoutGateway = (
            gateway if gateway is not None else LocalTestCheckout(settings.billing_public_url)
        )
        if gateway is None:
            log.warning("STRIPE_API_KEY is not set: billing runs in LOCAL TEST MODE (no real payments)")
        return cls(
            settings=settings,
            catalog=catalog,
            engine=engine,
            relay=relay,
            checkout=CheckoutService(
                engine, catalog, checkout_gateway, settings.success_url(), settings.cancel_url()
            ),
            webhooks=WebhookReceiver(engine, catalog, settings.webhook_secret, relay, gateway),
        )

    def readiness_checks(self) -> dict[str, ReadinessCheck]:
        return {"database": self._database_ready, "broker": self.relay.check}

    async def _database_ready(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    def start(self) -> None:
        # The relay connects in the background: a broker outage must not stop billing from starting
        # or from recording webhooks (they wait in the outbox).
        self.relay.start()

    async def aclose(self) -> None:
        await self.relay.stop()
        await self.engine.dispose()
