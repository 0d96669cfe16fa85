"""The proxy app, its composition root: create_app(settings) puts the long-lived objects (`runtime.Proxy`),
the routes and the ai.requests worker together; its lifespan starts them and, on shutdown, stops
taking work, lets in-flight work finish and settles what it can."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from services.proxy import openapi_spec as proxy_openapi
from shared.broker import Topology
from shared.vendor import CHARTJS_DIR
from shared.web import TemplateMount, create_service_app

from . import account_api, openai_api
from .config import ProxySettings
from .runtime import Proxy
from .worker import Worker


def create_app(settings: ProxySettings | None = None) -> FastAPI:
    settings = settings or ProxySettings()
    # Built eagerly so a bad PRICING_FILE stops the process before it listens.
    proxy = Proxy.build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        app.state.readiness_checks.update(proxy.readiness_checks())
        worker: Worker | None = None
        if proxy.broker is not None and settings.worker_enabled:
            assert proxy.redis is not None
            worker = Worker(proxy, proxy.broker, Topology(settings.broker_namespace), proxy.redis)
            await worker.start()
        try:
            yield
        finally:
            # One grace period for the whole stop, credits reachable or not: the worker's jobs, then
            # the settlements.
            loop = asyncio.get_running_loop()
            end = loop.time() + settings.shutdown_grace_seconds
            if worker is not None:
                await worker.stop(settings.shutdown_grace_seconds / 2)
            await proxy.aclose(max(end - loop.time() - 0.5, 0.5))

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
