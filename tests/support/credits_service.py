"""Run a real credits service in-process for tests of other services.

    from tests.support.credits_service import running_credits

    async with running_credits(
        database_url=make_database_url("credits"),   # a fresh database (conftest fixture)
        redis_url=redis_url,                          # conftest fixture (a per-run Redis DB)
        broker_namespace=broker_namespace,            # conftest fixture (isolates exchanges/queues)
        signup_credits=10,                            # any CreditsSettings field as a keyword override
    ) as credits:
        credits.url             # "http://127.0.0.1:<port>" — a real uvicorn server in this event loop
        credits.app             # the FastAPI app (credits.app.state.runtime holds the domain objects)
        credits.settings        # the CreditsSettings it runs with
        credits.internal_token  # Bearer token for internal endpoints
        credits.admin_token     # Bearer token for admin endpoints
        credits.headers         # {"Authorization": "Bearer <internal token>"}
        credits.admin_headers   # {"Authorization": "Bearer <admin token>"}

The service migrates its database on start, consumes `billing.pack.purchased` / `billing.pack.refunded`
on `credits.billing-events.<namespace>` and publishes its events on the namespaced events exchange, with
its sweeper and outbox relay running — exactly as `python -m services.credits` would. `rabbitmq_url`
defaults to the test broker. Every call starts a fresh service; several may share one database (they
then behave like several processes of one deployment).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from sqlalchemy.engine import make_url

from services.credits.app import create_app
from services.credits.config import CreditsSettings
from tests.support.servers import serve_app

DEFAULT_RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass(frozen=True)
class CreditsService:
    url: str
    app: FastAPI
    settings: CreditsSettings

    @property
    def internal_token(self) -> str:
        return self.settings.internal_token

    @property
    def admin_token(self) -> str:
        return self.settings.admin_token

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.internal_token}"}

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_token}"}


def credits_settings(
    *, database_url: str, redis_url: str, broker_namespace: str, **overrides: Any
) -> CreditsSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "broker_namespace": broker_namespace,
        "rabbitmq_url": DEFAULT_RABBITMQ_URL,
        "log_json": False,
        "sweep_interval_seconds": 0.2,
        # Redis mirrors one PostgreSQL database: tie the key namespace to it, so two credits services of
        # one test run (each with its own database) never sweep or rebuild each other's keys.
        "redis_namespace": f"credits-{make_url(database_url).database}",
    }
    values.update(overrides)
    return CreditsSettings(**values)


@contextlib.asynccontextmanager
async def running_credits(
    *, database_url: str, redis_url: str, broker_namespace: str, **overrides: Any
) -> AsyncIterator[CreditsService]:
    settings = credits_settings(
        database_url=database_url, redis_url=redis_url, broker_namespace=broker_namespace, **overrides
    )
    app = create_app(settings)
    async with serve_app(app) as url:
        yield CreditsService(url=url, app=app, settings=settings)
