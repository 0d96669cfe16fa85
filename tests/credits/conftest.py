"""Credits test fixtures: one real credits service for the package, a client, and PostgreSQL access."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from shared.holds.fast_path import RedisHolds
from tests.conftest import redis_client_for
from tests.credits.helpers import Checker
from tests.support.credits_service import CreditsService, running_credits


@pytest.fixture(scope="session")
def credits_database_url(make_database_url: Callable[[str], str]) -> str:
    return make_database_url("credits")


@pytest.fixture(scope="package")
async def credits(
    credits_database_url: str, redis_url: str, redis_cluster: bool, broker_namespace: str
) -> AsyncIterator[CreditsService]:
    async with running_credits(
        database_url=credits_database_url,
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        broker_namespace=broker_namespace,
    ) as service:
        yield service


@pytest.fixture(scope="package")
async def client(credits: CreditsService) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    async with httpx.AsyncClient(
        base_url=credits.url, headers=credits.headers, timeout=60, limits=limits
    ) as c:
        yield c


@pytest.fixture(scope="package")
async def pg(credits: CreditsService, credits_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    dsn = make_url(credits_database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="package")
def check(pg: asyncpg.Pool, credits: CreditsService) -> Checker:
    return Checker(pg, credits)


@pytest.fixture
async def redis_holds(
    credits: CreditsService, redis_url: str, redis_cluster: bool
) -> AsyncIterator[RedisHolds]:
    """The proxy's holds in credits' Redis (shared/holds/fast_path.py), as the proxy places them."""
    holds = RedisHolds(redis_client_for(redis_url, redis_cluster), namespace=credits.settings.redis_namespace)
    yield holds
    await holds.aclose()


@pytest.fixture
def user_id() -> str:
    return f"u-{uuid.uuid4().hex[:12]}"
