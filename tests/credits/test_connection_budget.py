"""The PostgreSQL connection budget of a credits process is what its settings say: DB_POOL_SIZE +
DB_MAX_OVERFLOW (SQLAlchemy) + DB_HOT_POOL_SIZE (the hot path's asyncpg pool), however hard it is
pushed; past that, requests wait for a connection and still succeed. (It was a fixed 20 + 4 + 20 = 44,
and two processes plus the tests reached PostgreSQL's 100.)"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from services.credits.runtime import MIGRATIONS_DIR
from shared.db import migrate
from tests.support.credits_service import running_credits
from tests.support.pgbouncer import PgBouncerUnavailable, local_pgbouncer


async def test_a_credits_process_stays_within_its_connection_budget(
    make_database_url: Callable[[str], str], redis_url: str, broker_namespace: str
) -> None:
    database_url = make_database_url("credits_budget")
    peak = await _spend_under_load(database_url, database_url, redis_url, broker_namespace)
    assert 0 < peak <= 2 + 1 + 3, peak


async def test_credits_behind_pgbouncer_in_transaction_mode(
    make_database_url: Callable[[str], str], redis_url: str, broker_namespace: str
) -> None:
    """DB_PGBOUNCER=true: no prepared-statement caches, so transaction pooling (each transaction on
    whichever server connection is free) works; PostgreSQL sees PgBouncer's 4 connections at most.
    Without it asyncpg's cached statements meet server connections that never prepared them."""
    try:
        bouncer = local_pgbouncer(server_pool_size=4)
        port = bouncer.__enter__()
    except PgBouncerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        direct_url = make_database_url("credits_bouncer")
        # Migrations take a session-level advisory lock: they run against PostgreSQL directly.
        await migrate(direct_url, MIGRATIONS_DIR)
        pooled_url = make_url(direct_url).set(port=port).render_as_string(hide_password=False)
        peak = await _spend_under_load(
            pooled_url, direct_url, redis_url, broker_namespace, db_pgbouncer=True, auto_migrate=False
        )
        assert 0 < peak <= 4, peak
    finally:
        bouncer.__exit__(None, None, None)


async def _spend_under_load(
    database_url: str, direct_url: str, redis_url: str, broker_namespace: str, **settings: Any
) -> int:
    """40 users spend 5 credits each (one reserve more than they can) against a credits process with
    2 + 1 + 3 connections; returns the most connections PostgreSQL saw for the database meanwhile."""
    database = make_url(direct_url).database
    async with (
        running_credits(
            database_url=database_url,
            redis_url=redis_url,
            broker_namespace=broker_namespace,
            db_pool_size=2,
            db_max_overflow=1,
            db_hot_pool_size=3,
            signup_credits=0,
            redis_namespace=f"credits-{database}",
            **settings,
        ) as credits,
        # Idle connections expire here before uvicorn's 5 s keep-alive closes them: requests that wait
        # for a database connection make some client connections idle that long.
        httpx.AsyncClient(
            base_url=credits.url,
            headers=credits.headers,
            timeout=60,
            limits=httpx.Limits(max_connections=200, keepalive_expiry=1.0),
        ) as http,
    ):
        admin = await asyncpg.connect(user="postgres", host="127.0.0.1", database="postgres")
        peak = 0
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                n = await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database)
                peak = max(peak, int(n))
                await asyncio.sleep(0.005)

        users = [f"budget-{uuid.uuid4().hex[:8]}" for _ in range(40)]

        async def spend(user: str) -> int:
            r = await http.post(
                f"/v1/admin/users/{user}/grants",
                json={"credits": 5, "reason": "t"},
                headers=credits.admin_headers,
            )
            assert r.status_code == 201, r.text
            charged = 0
            for _ in range(6):  # one more than the balance covers
                r = await http.post("/v1/reservations", json={"user_id": user, "amount": 1})
                if r.status_code == 402:
                    continue
                assert r.status_code == 201, r.text
                c = await http.post(f"/v1/reservations/{r.json()['reservation_id']}/commit", json={})
                assert c.status_code == 200, c.text
                charged += c.json()["charged"]
            return charged

        sampler = asyncio.create_task(sample())
        try:
            charged = await asyncio.gather(*(spend(u) for u in users))
        finally:
            stop.set()
            await sampler
            await admin.close()
        assert charged == [5] * len(users)
        for user in users:
            account = (await http.get(f"/v1/users/{user}/credits")).json()
            assert account["credits_remaining"] == 0 and account["credits_reserved"] == 0
        return peak
