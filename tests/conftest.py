"""Fixtures every test package can use. Each test run gets its own database names, Redis DB and
broker namespace, so concurrent runs on one machine cannot see each other."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import AsyncIterator, Callable

import aio_pika
import pytest
import redis.asyncio as aioredis

from shared.broker import Topology
from shared.db import drop_database
from tests.support.broker import delete_namespace

RUN_ID = uuid.uuid4().hex[:10]
PG_BASE = os.environ.get("TEST_PG_BASE", "postgresql+asyncpg://postgres@127.0.0.1:5432")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
# DB 0 is what `make run` uses; tests take another, chosen per run to keep concurrent runs apart.
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", random.randint(1, 15)))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


@pytest.fixture(scope="session")
def run_id() -> str:
    return RUN_ID


@pytest.fixture(scope="session")
def broker_namespace() -> str:
    return f"test-{RUN_ID}"


@pytest.fixture(scope="session")
def topology(broker_namespace: str) -> Topology:
    return Topology(broker_namespace)


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    return RABBITMQ_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
async def make_database_url() -> AsyncIterator[Callable[[str], str]]:
    """`make_database_url("credits")` → a fresh database URL for this run, dropped at the end."""
    created: list[str] = []

    def make(name: str) -> str:
        url = f"{PG_BASE}/cp_test_{name}_{RUN_ID}"
        created.append(url)
        return url

    yield make
    for url in created:
        try:
            await drop_database(url)
        except Exception:  # pragma: no cover - best effort cleanup
            pass


@pytest.fixture(scope="session")
async def amqp_connection(rabbitmq_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(rabbitmq_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="session", autouse=True)
async def _cleanup_broker_namespace() -> AsyncIterator[None]:
    """Deletes this run's exchanges and queues at the end (they are durable, so they would linger).
    Named directly, not through the fixture, which a test package may override with its own."""
    yield
    await delete_namespace(RABBITMQ_URL, f"test-{RUN_ID}")


@pytest.fixture(scope="session")
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


async def eventually(check: Callable[[], object], timeout: float = 10.0, interval: float = 0.05) -> object:
    """Polls `check` (sync or async) until it returns a truthy value; fails with the last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: object = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)
