"""create_app(settings): the credits service with its lifespan (engine, Redis, broker, background tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from fastapi import FastAPI, Request
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import FileResponse

from services.credits import openapi_spec as credits_openapi
from services.credits.api import admin, hot_routes, internal
from services.credits.apikeys import ApiKeys
from services.credits.config import CreditsSettings
from services.credits.consumers import QUEUE, ROUTING_KEYS, BillingEventsConsumer
from services.credits.holds import Holds
from services.credits.ledger import Clock, Ledger, utcnow
from services.credits.sweeper import Sweeper
from shared.broker import Topology, connect, consume
from shared.db import create_hot_pool, engine_for, ensure_database, migrate
from shared.errors import ServiceUnavailable, error_response
from shared.outbox import OutboxRelay
from shared.redis_client import REDIS_ERRORS, AnyRedis, redis_client
from shared.responses import JsonResponse
from shared.static_files import CompressedStaticFiles
from shared.vendor import CHARTJS_DIR
from shared.web import create_service_app

log = logging.getLogger("credits.app")

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
DASHBOARD_DIR = Path(__file__).parent / "dashboard"


@dataclass
class Runtime:
    """Everything the service holds open. Tests build one directly to restart the service in-process."""

    settings: CreditsSettings
    engine: AsyncEngine
    pool: asyncpg.Pool
    redis: AnyRedis
    ledger: Ledger
    api_keys: ApiKeys
    sweeper: Sweeper
    connection: AbstractRobustConnection | None = None
    relay: OutboxRelay | None = None
    consumer: BillingEventsConsumer | None = None
    _consumer_channel: AbstractChannel | None = None
    _consumer_tag: str | None = None
    _consumer_queue: Any = None
    _in_flight: set[asyncio.Task[Any]] = field(default_factory=set)

    @classmethod
    async def open(cls, settings: CreditsSettings, *, broker: bool = True, clock: Clock = utcnow) -> Runtime:
        if settings.auto_migrate:
            await migrate(settings.database_url, MIGRATIONS_DIR)
        else:
            await ensure_database(settings.database_url)
        # A fixed pool (little overflow): opening and closing overflow connections under load costs
        # more than waiting briefly for a pooled one.
        engine = engine_for(settings)
        # The hot path (hold batches, commit, release) calls server-side functions over raw asyncpg.
        pool = await create_hot_pool(settings, settings.db_hot_pool_size)
        # Past REDIS_MAX_CONNECTIONS commands in flight a caller waits for a connection (up to
        # REDIS_POOL_TIMEOUT_SECONDS) instead of failing, so a burst queues rather than 503s.
        redis = redis_client(settings)
        holds = Holds(
            redis,
            settings.deadline_shards,
            settings.redis_namespace,
            grace_ms=int(settings.orphan_grace_seconds * 1000),
        )
        relay: OutboxRelay | None = None
        connection = None
        if broker:
            connection = await connect(settings.rabbitmq_url, "credits")
            # Credits' events are for whoever listens (no queue of ours takes them): one that no queue
            # would receive is dropped, not kept pending (require_route stays off).
            relay = OutboxRelay(
                engine,
                broker_url=settings.rabbitmq_url,
                topology=Topology(settings.broker_namespace),
                connection_name="credits-outbox-relay",
            )
        ledger = Ledger(
            engine, pool, holds, settings, on_outbox=relay.wake if relay else lambda: None, clock=clock
        )
        await ledger.start()
        runtime = cls(
            settings=settings,
            engine=engine,
            pool=pool,
            redis=redis,
            ledger=ledger,
            api_keys=ApiKeys(engine),
            sweeper=Sweeper(ledger, settings.sweep_interval_seconds),
            connection=connection,
            relay=relay,
        )
        if settings.run_background_tasks:
            runtime.sweeper.start()
            if relay is not None:
                relay.start()
        if connection is not None and settings.run_consumer:
            await runtime.start_consumer()
        return runtime

    async def start_consumer(self) -> None:
        assert self.connection is not None
        consumer = BillingEventsConsumer(self.ledger)

        async def tracked(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                await consumer.handle(message)
            finally:
                self._in_flight.discard(task)

        self.consumer = consumer
        channel, queue, tag = await consume(
            self.connection,
            Topology(self.settings.broker_namespace),
            QUEUE,
            tracked,
            routing_keys=ROUTING_KEYS,
            prefetch=self.settings.consumer_prefetch,
        )
        self._consumer_channel, self._consumer_queue, self._consumer_tag = channel, queue, tag

    async def close(self) -> None:
        # Stop taking messages, let the in-flight ones finish, then stop the background work and pools.
        if self._consumer_queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._consumer_queue.cancel(self._consumer_tag)
        for _ in range(200):
            if not self._in_flight:
                break
            await asyncio.sleep(0.05)
        if self._consumer_channel is not None:
            with contextlib.suppress(Exception):
                await self._consumer_channel.close()
        await self.sweeper.close()
        await self.ledger.close()
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await self.relay.drain()
            await self.relay.stop()
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
        await self.pool.close()
        await self.redis.aclose()  # type: ignore[attr-defined]  # stubs predate redis-py 5
        await self.engine.dispose()


def create_app(settings: CreditsSettings, *, clock: Clock = utcnow) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.open(settings, clock=clock)
        app.state.runtime = runtime
        app.state.ledger = runtime.ledger
        app.state.api_keys = runtime.api_keys

        async def database() -> None:
            async with runtime.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        async def redis() -> None:
            await runtime.ledger.holds.probe()

        async def broker() -> None:
            if runtime.connection is None or runtime.connection.is_closed:
                raise ConnectionError("broker connection closed")
            if not runtime.connection.connected.is_set():
                raise ConnectionError("broker reconnecting")

        app.state.readiness_checks.update({"database": database, "redis": redis, "broker": broker})
        if runtime.relay is not None and settings.run_background_tasks:
            app.state.readiness_checks["outbox"] = runtime.relay.check
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
