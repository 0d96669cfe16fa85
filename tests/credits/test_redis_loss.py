"""Redis is a mirror: flushed while the service runs, everything comes back from PostgreSQL."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis

from tests.credits.helpers import Checker, assert_envelope

# Redis wiped or restarted under the service: on a single node and on Redis Cluster.
pytestmark = pytest.mark.both_redis


async def test_flushdb_while_running_loses_and_doubles_nothing(
    client: httpx.AsyncClient, check: Checker, redis_client: aioredis.Redis, user_id: str
) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    grant = await client.post(
        f"/v1/admin/users/{user_id}/grants",
        json={"credits": 90, "reason": "test"},
        headers={"Authorization": f"Bearer {check.credits.admin_token}"},
    )
    assert grant.status_code == 201
    open_hold = (await client.post("/v1/reservations", json={"user_id": user_id, "amount": 30})).json()
    assert open_hold["credits_remaining"] == 70
    to_commit = (await client.post("/v1/reservations", json={"user_id": user_id, "amount": 20})).json()
    committed = await client.post(
        f"/v1/reservations/{to_commit['reservation_id']}/commit", json={"amount": 15}
    )
    assert committed.json()["credits_remaining"] == 100 - 15 - 30

    await redis_client.flushdb()

    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    # Never read as zero, never as a fresh balance: the open hold is still held.
    assert acct["credits_remaining"] == 55 and acct["credits_reserved"] == 30
    assert_envelope(
        await client.post("/v1/reservations", json={"user_id": user_id, "amount": 56}),
        402,
        "insufficient_credits",
    )
    # Repeating the commit after the wipe charges nothing more.
    again = await client.post(f"/v1/reservations/{to_commit['reservation_id']}/commit")
    assert again.json()["charged"] == 15 and again.json()["credits_remaining"] == 55
    await redis_client.flushdb()
    released = await client.post(f"/v1/reservations/{open_hold['reservation_id']}/release")
    assert released.json()["refunded"] == 30 and released.json()["credits_remaining"] == 85
    await check.consistent(user_id, client)


async def test_flushdb_during_concurrent_traffic(
    client: httpx.AsyncClient, check: Checker, redis_client: aioredis.Redis, user_id: str
) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    await client.post(
        f"/v1/admin/users/{user_id}/grants",
        json={"credits": 190, "reason": "test"},
        headers={"Authorization": f"Bearer {check.credits.admin_token}"},
    )

    async def one(i: int) -> int:
        r = await client.post(
            "/v1/reservations", json={"user_id": user_id, "amount": 3, "idempotency_key": f"k{i}"}
        )
        if r.status_code != 201:
            return 0
        rid = r.json()["reservation_id"]
        if i % 3 == 0:
            await client.post(f"/v1/reservations/{rid}/release")
            return 0
        c = await client.post(f"/v1/reservations/{rid}/commit", json={"amount": 2})
        assert c.status_code == 200, c.text
        return 2

    async def wipe() -> None:
        for _ in range(5):
            await asyncio.sleep(0.05)
            await redis_client.flushdb()

    results = await asyncio.gather(*(one(i) for i in range(120)), wipe())
    charged = sum(r for r in results if isinstance(r, int))
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 200 - charged
    assert not [h for h in s["holds"] if h["status"] == "held"]
    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    assert acct["credits_remaining"] == 200 - charged and acct["credits_reserved"] == 0


async def test_scripts_flushed_as_by_a_redis_restart_are_loaded_again(
    client: httpx.AsyncClient, check: Checker, redis_client: aioredis.Redis, user_id: str
) -> None:
    """A restarted Redis has neither the data nor the scripts: single calls and pipelined ones
    (a batch of commits runs apply.lua once per item in one round trip) load them again and run once."""
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    await client.post(
        f"/v1/admin/users/{user_id}/grants",
        json={"credits": 40, "reason": "test"},
        headers={"Authorization": f"Bearer {check.credits.admin_token}"},
    )
    held = [
        (await client.post("/v1/reservations", json={"user_id": user_id, "amount": 5})).json()[
            "reservation_id"
        ]
        for _ in range(3)
    ]
    await redis_client.script_flush()
    batch = await client.post(
        "/v1/reservations/batch",
        json={"items": [{"reservation_id": rid, "action": "commit"} for rid in held[:2]]},
    )
    assert [r["status"] for r in batch.json()["results"]] == [200, 200]
    await redis_client.script_flush()
    await redis_client.flushdb()
    again = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 1})
    assert again.status_code == 201 and again.json()["credits_remaining"] == 50 - 10 - 5 - 1
    await redis_client.script_flush()
    released = await client.post(f"/v1/reservations/{held[2]}/release")
    assert released.json()["refunded"] == 5 and released.json()["credits_remaining"] == 50 - 10 - 1
    await check.consistent(user_id, client)
