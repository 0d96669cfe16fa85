"""create_app(settings): the credits service's FastAPI app: routes, error mapping, readiness checks and the
operator dashboard; its lifespan opens and closes a Runtime (runtime.py)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
from fastapi import FastAPI, Request
from sqlalchemy import text
from starlette.responses import FileResponse

from services.credits import openapi_spec as credits_openapi
from services.credits.api import admin, internal
from services.credits.api_hot import hot_routes
from services.credits.clock import Clock, utcnow
from services.credits.config import CreditsSettings
from services.credits.runtime import Runtime
from shared.errors import ServiceUnavailable, error_response
from shared.redis_client import REDIS_ERRORS
from shared.responses import JsonResponse
from shared.static_files import CompressedStaticFiles
from shared.vendor import CHARTJS_DIR
from shared.web import create_service_app

log = logging.getLogger("credits.app")

DASHBOARD_DIR = Path(__file__).parent / "dashboard"


def create_app(settings: CreditsSettings, *, clock: Clock = utcnow) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.open(settings, clock=clock)
        app.state.runtime = runtime

        async def database() -> None:
            async with runtime.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        async def redis() -> None:
            await runtime.holds.probe()

        async def broker() -> None:
            if runtime.connection is None or runtime.connection.is_closed:
                raise ConnectionError("broker connection closed")
            if not runtime.connection.connected.is_set():
                raise ConnectionError("broker reconnecting")

        app.state.readiness_checks.update({"database": database, "redis": redis, "broker": broker})
        try:
            yield
        finally:
            await runtime.close()

    app = create_service_app(
        settings.service_name,
        max_body_bytes=settings.max_body_bytes,
        lifespan=lifespan,
        # Prometheus carries the metrics; FastAPI's OpenTelemetry hooks would only cost time per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings

    async def dependency_down(request: Request, exc: Exception) -> JsonResponse:
        # Redis or PostgreSQL unreachable: nothing was acknowledged, the caller may retry.
        log.warning("%s %s: dependency unavailable: %r", request.method, request.url.path, exc)
        return error_response(503, "service_unavailable", ServiceUnavailable.default_message)

    for exc_type in (*REDIS_ERRORS, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
        app.add_exception_handler(exc_type, dependency_down)
    app.add_hot_routes(hot_routes)
    app.include_router(internal)
    app.include_router(admin)

    # The operator dashboard: static files only; its script calls /v1/admin/analytics with the token.
    # Its own files are revalidated on each load (ETag, 304), the pinned Chart.js kept for a day;
    # both are sent gzipped (Chart.js 212 kB → 72 kB).
    async def dashboard() -> FileResponse:
        return FileResponse(
            DASHBOARD_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
        )

    app.add_api_route("/admin/", dashboard, methods=["GET"], include_in_schema=False)
    app.mount(
        "/admin/assets",
        CompressedStaticFiles(directory=DASHBOARD_DIR, cache_control="no-cache"),
        name="dashboard",
    )
    app.mount(
        "/admin/vendor",
        CompressedStaticFiles(directory=CHARTJS_DIR, cache_control="public, max-age=86400"),
        name="vendor",
    )
    credits_openapi.describe(app)
    return app
