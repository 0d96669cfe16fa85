"""Fixtures every test package can use. Each test run gets its own database names, Redis DB and
broker namespace, so concurrent runs on one machine cannot see each other."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import aio_pika
import pytest
import redis.asyncio as aioredis

from shared.broker import Topology
from shared.db import drop_database
from shared.redis_client import redis_client as make_redis_client
from shared.settings import RedisSettings
from tests.support.broker import delete_namespace
from tests.support.redis_cluster import local_cluster

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


# `@pytest.mark.both_redis` runs a test (and the package's services it uses) twice: against the single
# Redis node and against a local 3-master Redis Cluster started for the session (tests/support/redis_cluster.py).
# TEST_REDIS_CLUSTER=0 runs them on the single node only (a machine without redis-server).
CLUSTER_TESTS = os.environ.get("TEST_REDIS_CLUSTER", "1") != "0"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_redis: run on a single Redis node and on a local 3-master Redis Cluster"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test that reaches Redis gets the mode as a package-scoped parameter, so the package's
    # services (built on `redis_url`) are shared by the tests of one mode and started once per mode.
    if "redis_mode" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_redis") is not None and CLUSTER_TESTS
        modes = ["single", "cluster"] if both else ["single"]
        metafunc.parametrize("redis_mode", modes, indirect=True, scope="package")


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A local 3-master Redis Cluster for the session, started on first use (`make test` needs nothing
    else: the installed redis-server and redis-cli). Without them (a machine whose Redis runs in
    Docker) the cluster variants are skipped, saying why."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip(
            "redis-server/redis-cli not installed: no local Redis Cluster (TEST_REDIS_CLUSTER=0 hides these)"
        )
    with local_cluster() as url:
        yield url


@pytest.fixture(scope="package")
def redis_mode(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "single"))


@pytest.fixture(scope="package")
def redis_cluster(redis_mode: str) -> bool:
    """REDIS_CLUSTER for the services of this test: True with `redis_url` naming a cluster node."""
    return redis_mode == "cluster"


@pytest.fixture(scope="package")
def redis_url(redis_mode: str, request: pytest.FixtureRequest) -> str:
    if redis_mode == "cluster":
        return str(request.getfixturevalue("redis_cluster_url"))
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


@pytest.fixture(scope="package")
async def redis_client(redis_url: str, redis_cluster: bool) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's Redis (a cluster client in cluster mode; `flushdb` then empties every master)."""
    client = redis_client_for(redis_url, redis_cluster)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


def redis_client_for(redis_url: str, cluster: bool) -> aioredis.Redis:
    """A client of the kind the services build (`shared.redis_client`), for tests' own use."""
    return make_redis_client(RedisSettings(redis_url=redis_url, redis_cluster=cluster))


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
