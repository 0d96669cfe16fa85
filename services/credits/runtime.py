"""Credits' composition root: builds and starts the long-lived objects (engine, pools, Redis, broker,
the domain objects, writers, sweeper, relay, consumer) and closes them. The app's lifespan uses it;
tests build one directly to restart the service in-process."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from services.credits.accounts import Accounts
from services.credits.analytics import Analytics
from services.credits.apikeys import ApiKeys
from services.credits.clock import Clock, utcnow
from services.credits.config import CreditsSettings
from services.credits.consumers import QUEUE, ROUTING_KEYS, BillingEventsConsumer
from services.credits.expiry import Expiry
from services.credits.holds import Holds
from services.credits.mirror import Mirror
from services.credits.outbox import OutboxRelay
from services.credits.pending import PendingSettlements
from services.credits.purchases import Purchases
from services.credits.reservations import Reservations
from services.credits.settlements import Settlements
from services.credits.sweeper import Sweeper
from shared.broker import Publisher, Topology, connect, consume
from shared.db import create_hot_pool, engine_for, ensure_database, migrate
from shared.redis_client import AnyRedis, redis_client

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


@dataclass
class Runtime:
    """Everything the service holds open. Tests build one directly to restart the service in-process."""

    settings: CreditsSettings
    engine: AsyncEngine
    pool: asyncpg.Pool
    redis: AnyRedis
    holds: Holds
    mirror: Mirror
    accounts: Accounts
    purchases: Purchases
    reservations: Reservations
    settlements: Settlements
    pending: PendingSettlements
    expiry: Expiry
    analytics: Analytics
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
            relay = OutboxRelay(engine, Publisher(connection, Topology(settings.broker_namespace)))
        on_outbox = relay.kick if relay else lambda: None
        mirror = Mirror(engine, holds, clock)
        accounts = Accounts(mirror, settings, on_outbox=on_outbox)
        reservations = Reservations(mirror, pool, settings)
        settlements = Settlements(mirror, pool, reservations, settings, on_outbox=on_outbox)
        pending = PendingSettlements(mirror, reservations, settlements, settings)
        # A rebuild applies the user's pending entries first (the mirror is built before them).
        mirror.drain_pending = pending.drain_pending
        purchases = Purchases(mirror, accounts, reservations, on_outbox=on_outbox)
        expiry = Expiry(mirror, settings)
        analytics = Analytics(engine)
        await reservations.start()
        await settlements.start()
        runtime = cls(
            settings=settings,
            engine=engine,
            pool=pool,
            redis=redis,
            holds=holds,
            mirror=mirror,
            accounts=accounts,
            purchases=purchases,
            reservations=reservations,
            settlements=settlements,
            pending=pending,
            expiry=expiry,
            analytics=analytics,
            api_keys=ApiKeys(engine),
            sweeper=Sweeper(pending, expiry, mirror, analytics, settings.sweep_interval_seconds),
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
        consumer = BillingEventsConsumer(self.purchases)

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
        await self.reservations.close()
        await self.settlements.close()
        if self.relay is not None:
            with contextlib.suppress(Exception):
                await self.relay.publish_pending()
            await self.relay.close()
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()
        await self.pool.close()
        await self.redis.aclose()  # type: ignore[attr-defined]  # stubs predate redis-py 5
        await self.engine.dispose()
