"""create_app(settings): billing's routes, and a lifespan that opens, starts and closes its runtime
(`runtime.BillingRuntime`: engine, Stripe client, outbox relay)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.billing import openapi_spec as billing_openapi
from services.billing.api import router
from services.billing.catalog import load_catalog
from services.billing.config import BillingSettings
from services.billing.runtime import BillingRuntime
from shared.web import create_service_app


def create_app(settings: BillingSettings) -> FastAPI:
    # Loaded here, not in the lifespan, so a bad PACKS_FILE stops the process before it listens.
    catalog = load_catalog(settings.packs_file)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await BillingRuntime.open(settings, catalog)
        app.state.runtime = runtime
        app.state.readiness_checks.update(runtime.readiness_checks())
        runtime.start()
        try:
            yield
        finally:
            await runtime.aclose()

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
