"""create_app(settings) and the lifespan that owns billing's engine, Stripe client and outbox relay."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import text

from services.billing import openapi_spec as billing_openapi
from services.billing.api import router
from services.billing.catalog import load_catalog
from services.billing.checkout import CheckoutGateway, CheckoutService, LocalTestCheckout
from services.billing.config import BillingSettings
from services.billing.runtime import BillingRuntime
from services.billing.stripe_gateway import StripeGateway
from services.billing.webhooks import WebhookReceiver
from shared.broker import Topology
from shared.db import engine_for, migrate
from shared.outbox import OutboxRelay
from shared.web import create_service_app

log = logging.getLogger("billing.app")
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


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


def create_app(settings: BillingSettings) -> FastAPI:
    # Loaded here, not in the lifespan, so a bad PACKS_FILE stops the process before it listens.
    catalog = load_catalog(settings.packs_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auto_migrate:
            await migrate(settings.database_url, MIGRATIONS_DIR)
        engine = engine_for(settings)
        relay = build_relay(settings, engine)
        gateway = stripe_gateway(settings)
        checkout_gateway: CheckoutGateway = (
            gateway if gateway is not None else LocalTestCheckout(settings.billing_public_url)
        )
        if gateway is None:
            log.warning("STRIPE_API_KEY is not set: billing runs in LOCAL TEST MODE (no real payments)")
        app.state.runtime = BillingRuntime(
            settings=settings,
            catalog=catalog,
            engine=engine,
            relay=relay,
            checkout=CheckoutService(
                engine, catalog, checkout_gateway, settings.success_url(), settings.cancel_url()
            ),
            webhooks=WebhookReceiver(engine, catalog, settings.webhook_secret, relay, gateway),
        )

        async def database() -> None:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        app.state.readiness_checks["database"] = database
        app.state.readiness_checks["broker"] = relay.check
        # The relay connects in the background: a broker outage must not stop billing from starting
        # or from recording webhooks (they wait in the outbox).
        relay.start()
        try:
            yield
        finally:
            await relay.stop()
            await engine.dispose()

    app = create_service_app(
        "billing",
        max_body_bytes=settings.max_body_bytes,
        public_base_url=settings.public_base_url,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(router)
    billing_openapi.describe(app)
    return app
