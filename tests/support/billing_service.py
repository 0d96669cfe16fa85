"""Runs the billing service in-process for tests: real uvicorn on a free port, real PostgreSQL and RabbitMQ."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from services.billing.app import create_app
from services.billing.config import BillingSettings
from services.billing.runtime import BillingRuntime
from tests.support.servers import bound_socket, serve_app

WEBHOOK_SECRET = "whsec_test_billing_secret"


@dataclass
class RunningBilling:
    url: str
    app: FastAPI
    settings: BillingSettings

    @property
    def runtime(self) -> BillingRuntime:
        rt: BillingRuntime = self.app.state.runtime
        return rt

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kwargs)

    def internal_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.internal_token}"}


@contextlib.asynccontextmanager
async def running_billing(
    *,
    database_url: str,
    rabbitmq_url: str,
    broker_namespace: str,
    stripe_api_base: str | None = None,
    stripe_api_key: str | None = None,
    webhook_secret: str | None = WEBHOOK_SECRET,
    **overrides: Any,
) -> AsyncIterator[RunningBilling]:
    """Billing with Stripe at `stripe_api_base` (a fake server) when a key is given, else in local test mode."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    settings = BillingSettings(
        database_url=database_url,
        rabbitmq_url=rabbitmq_url,
        broker_namespace=broker_namespace,
        stripe_api_key=stripe_api_key,
        stripe_api_base=stripe_api_base,
        stripe_webhook_secret=webhook_secret,
        billing_public_url=f"http://127.0.0.1:{port}",
        outbox_poll_seconds=0.5,
        outbox_max_backoff_seconds=1.0,
        **overrides,
    )
    app = create_app(settings)
    async with serve_app(app, sock=sock) as url:
        yield RunningBilling(url=url, app=app, settings=settings)
