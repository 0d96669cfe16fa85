"""The proxy app: create_app(settings) and a lifespan that owns the pools, the broker connection and
the ai.requests worker, and on shutdown stops taking work, lets in-flight work finish and settles
what it can."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from services.proxy import openapi_spec as proxy_openapi
from shared.broker import Topology, connect
from shared.redis_client import probe, redis_client
from shared.vendor import CHARTJS_DIR
from shared.web import TemplateMount, create_service_app

from . import account_api, openai_api
from .config import ProxySettings
from .runtime import Proxy
from .worker import Worker

log = logging.getLogger("proxy.app")


def create_app(settings: ProxySettings | None = None) -> FastAPI:
    settings = settings or ProxySettings()
    # Built eagerly so a bad PRICING_FILE stops the process before it listens.
    proxy = Proxy.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The worker's job records (REDIS_CLUSTER picks the kind of client, like for the holds).
        redis = redis_client(settings)
        connection = None
        worker: Worker | None = None
        checks = app.state.readiness_checks

        async def credits_ready() -> None:
            response = await proxy.credits.call(b"GET", "/healthz")
            if response.status != 200:
                raise RuntimeError(f"credits answered {response.status}")

        async def broker_ready() -> None:
            if connection is None or connection.is_closed:
                raise RuntimeError("no broker connection")

        checks["credits"] = credits_ready
        checks["broker"] = broker_ready
        checks["redis"] = functools.partial(probe, redis, settings.redis_namespace)
        try:
            connection = await connect(settings.rabbitmq_url, "proxy")
        except Exception:
            log.exception("cannot reach RabbitMQ at start; the worker is off until restart")
        if connection is not None and settings.worker_enabled:
            worker = Worker(proxy, connection, Topology(settings.broker_namespace), redis)
            await worker.start()
        try:
            yield
        finally:
            # One grace period for the whole stop, credits reachable or not: the worker's jobs, then
            # the settlements (sent, or parked in credits' Redis when credits is gone).
            loop = asyncio.get_running_loop()
            end = loop.time() + settings.shutdown_grace_seconds
            if worker is not None:
                await worker.stop(settings.shutdown_grace_seconds / 2)
            await proxy.meter.drain(max(end - loop.time() - 0.5, 0.5))
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
            await redis.aclose()  # type: ignore[attr-defined]
            await proxy.aclose()

    app = create_service_app(
        "proxy",
        max_body_bytes=settings.max_body_bytes,
        public_base_url=settings.public_base_url,
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.proxy = proxy
    app.add_hot_routes(openai_api.hot_routes)
    app.include_router(account_api.router)
    # Chart.js for the portal's usage chart (the copy credits' dashboard uses too); before /portal.
    app.router.routes.append(
        TemplateMount("/portal/vendor", StaticFiles(directory=CHARTJS_DIR), name="portal-vendor")
    )
    app.router.routes.append(
        TemplateMount("/portal", StaticFiles(directory=account_api.PORTAL_DIR), name="portal")
    )
    proxy_openapi.describe(app)
    return app


__all__ = ["create_app"]
