"""Holds placed straight in Redis with credits' reserve.lua (the proxy's fast path, shared/holds/fast_path.py)
and then recorded through POST /v1/reservations/batch ("hold" items).

Such a hold is only in Redis until recorded; recording must be idempotent, must refuse a hold that is
not really in Redis, and must keep the invariants when Redis is wiped in between."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.holds.fast_path import PlacedHold, RedisHolds
from shared.holds.protocol import user_keys
from tests.conftest import eventually, redis_client_for
from tests.credits.helpers import Checker, assert_envelope

# The proxy's holds in credits' Redis: on a single node and on Redis Cluster.
pytestmark = pytest.mark.both_redis


async def _user(client: httpx.AsyncClient, check: Checker, user_id: str, credits: int = 10) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    if credits > 10:
        r = await client.post(
            f"/v1/admin/users/{user_id}/grants",
            json={"credits": credits - 10, "reason": "test"},
            headers=check.credits.admin_headers,
        )
        assert r.status_code == 201, r.text


async def _record(client: httpx.AsyncClient, *placed: PlacedHold | dict[str, Any]) -> list[dict[str, Any]]:
    items = [p.record() if isinstance(p, PlacedHold) else p for p in placed]
    r = await client.post("/v1/reservations/batch", json={"items": items})
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["results"]
    return results


async def _settle(
    client: httpx.AsyncClient, rid: str, action: str, amount: int | None = None
) -> dict[str, Any]:
    item: dict[str, Any] = {"reservation_id": rid, "action": action}
    if amount is not None:
        item["amount"] = amount
    r = await client.post("/v1/reservations/batch", json={"items": [item]})
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()["results"][0]
    return result


async def test_a_placed_hold_is_recorded_once_and_commits_once(
    client: httpx.AsyncClient, check: Checker, redis_holds: RedisHolds, user_id: str
) -> None:
    await _user(client, check, user_id)
    placed = await redis_holds.place(user_id, 4)
    assert placed is not None and placed.available == 6 and placed.amount == 4
    # Held in Redis before credits has heard of it.
    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    assert (acct["credits_remaining"], acct["credits_reserved"]) == (6, 4)

    # Recorded, then recorded again (a retried batch), also concurrently: one reservation row.
    first = await _record(client, placed)
    assert first[0]["status"] == 201 and first[0]["amount"] == 4, first
    again = await asyncio.gather(*(_record(client, placed) for _ in range(4)))
    assert all(r[0]["status"] == 201 for r in again), again
    s = await check.consistent(user_id, client)
    assert [(h["amount"], h["status"]) for h in s["holds"]] == [(4, "held")]

    committed = await _settle(client, placed.reservation_id, "commit", 3)
    assert (committed["status"], committed["charged"], committed["refunded"]) == (200, 3, 1)
    assert committed["credits_remaining"] == 7
    # A late duplicate of the record after the commit changes nothing.
    late = await _record(client, placed)
    assert late[0]["status"] == 201
    s = await check.consistent(user_id, client)
    assert [(h["amount"], h["status"], h["charged"]) for h in s["holds"]] == [(4, "committed", 3)]
    assert s["account"]["balance"] == 7
    assert [e["amount"] for e in s["ledger"]] == [10, -3]


async def test_a_hold_that_is_not_in_redis_is_refused_and_can_never_be_committed(
    client: httpx.AsyncClient, check: Checker, redis_client: aioredis.Redis, user_id: str
) -> None:
    """A record for a hold never placed, under the account's current epoch (a bug or a forgery)."""
    await _user(client, check, user_id)
    account_key = check.credits.app.state.runtime.holds.account_key(user_id)
    epoch = (await redis_client.hget(account_key, "e")).decode()
    forged = PlacedHold(str(uuid.uuid4()), user_id, 5, 10, epoch, int(time.time() * 1000) + 60_000)
    (result,) = await _record(client, forged)
    assert result["status"] == 402 and result["error"]["code"] == "insufficient_credits", result
    committed = await _settle(client, forged.reservation_id, "commit", 5)
    assert committed["status"] == 409, committed
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 10 and [e["amount"] for e in s["ledger"]] == [10]
    assert [(h["status"], h["charged"]) for h in s["holds"]] == [("released", None)]


async def test_bad_hold_items_change_nothing(
    client: httpx.AsyncClient, check: Checker, redis_holds: RedisHolds, user_id: str
) -> None:
    await _user(client, check, user_id)
    placed = await redis_holds.place(user_id, 2)
    assert placed is not None
    now_ms = int(time.time() * 1000)
    past = {**placed.record(), "reservation_id": str(uuid.uuid4()), "deadline_ms": now_ms - 1}
    too_far = {**placed.record(), "reservation_id": str(uuid.uuid4()), "deadline_ms": now_ms + 10**12}
    not_uuid = {**placed.record(), "reservation_id": "not-a-uuid"}
    stranger = {**placed.record(), "reservation_id": str(uuid.uuid4()), "user_id": f"nobody-{user_id}"}
    results = await _record(client, past, too_far, not_uuid, stranger)
    assert [(r["status"], r["error"]["code"]) for r in results] == [
        (409, "conflict"),
        (400, "invalid_request"),
        (400, "invalid_request"),
        (404, "not_found"),
    ], results
    for bad in (
        {**placed.record(), "amount": 0},
        {**placed.record(), "amount": "2"},
        {**placed.record(), "epoch": 1},
        {**placed.record(), "deadline_ms": 1.5},
        {**placed.record(), "user_id": "bad\x00id"},
    ):
        [result] = await _record(client, bad)
        assert result["status"] in (400, 422) and result["error"]["code"] == "invalid_request", (bad, result)
    assert_envelope(
        await client.post(
            "/v1/reservations/batch",
            json={"items": [placed.record()]},
            headers={"Authorization": "Bearer wrong"},
        ),
        401,
        "unauthorized",
    )
    s = await check.state(user_id)
    assert s["holds"] == [] and s["account"]["balance"] == 10
    # The genuine hold is untouched by all of it, and still records.
    assert (await _record(client, placed))[0]["status"] == 201
    s = await check.consistent(user_id, client)
    assert [(h["amount"], h["status"]) for h in s["holds"]] == [(2, "held")]


async def _placed_then_wiped(
    client: httpx.AsyncClient,
    check: Checker,
    redis_holds: RedisHolds,
    redis_client: aioredis.Redis,
    user_id: str,
) -> PlacedHold:
    """A hold of 4 of the user's 10 credits placed in Redis, then the user's Redis keys lost."""
    await _user(client, check, user_id)
    placed = await redis_holds.place(user_id, 4)
    assert placed is not None
    holds = check.credits.app.state.runtime.holds
    await redis_client.delete(*holds.keys(user_id), holds.pending_key(user_id))
    return placed


async def test_redis_wiped_before_the_record_restores_the_hold_when_the_balance_still_covers_it(
    client: httpx.AsyncClient,
    check: Checker,
    redis_holds: RedisHolds,
    redis_client: aioredis.Redis,
    user_id: str,
) -> None:
    placed = await _placed_then_wiped(client, check, redis_holds, redis_client, user_id)
    # The rebuild (from PostgreSQL, which has not heard of the hold) reads 10 available...
    assert (await client.get(f"/v1/users/{user_id}/credits")).json()["credits_remaining"] == 10
    (result,) = await _record(client, placed)
    # ...and the record puts the hold back: it covers it, so nothing is lost and nothing given away.
    assert result["status"] == 201, result
    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    assert (acct["credits_remaining"], acct["credits_reserved"]) == (6, 4)
    assert (await _settle(client, placed.reservation_id, "commit"))["charged"] == 4
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 6


async def test_redis_wiped_before_the_record_and_the_balance_spent_refuses_the_hold(
    client: httpx.AsyncClient,
    check: Checker,
    redis_holds: RedisHolds,
    redis_client: aioredis.Redis,
    user_id: str,
) -> None:
    placed = await _placed_then_wiped(client, check, redis_holds, redis_client, user_id)
    # After the rebuild all 10 credits look free, and another request takes 8 of them.
    other = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 8})
    assert other.status_code == 201, other.text
    (result,) = await _record(client, placed)
    assert result["status"] == 402, result
    # The lost hold can never be charged, so the balance is never overspent.
    assert (await _settle(client, placed.reservation_id, "commit", 4))["status"] == 409
    assert (await _settle(client, other.json()["reservation_id"], "commit"))["charged"] == 8
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 2
    assert sorted((h["amount"], h["status"]) for h in s["holds"]) == [(4, "released"), (8, "committed")]


async def test_a_placed_hold_that_is_never_recorded_lapses_without_a_trace(
    client: httpx.AsyncClient, check: Checker, redis_url: str, redis_cluster: bool, user_id: str
) -> None:
    """The proxy died between placing the hold and recording it: after the deadline (and the grace
    period) the credits are back; the hold's record, beside it in Redis, was recorded and expired."""
    await _user(client, check, user_id)
    short = RedisHolds(
        redis_client_for(redis_url, redis_cluster),
        namespace=check.credits.settings.redis_namespace,
        ttl_seconds=1,
    )
    try:
        placed = await short.place(user_id, 7)
    finally:
        await short.aclose()
    assert placed is not None
    assert (await client.get(f"/v1/users/{user_id}/credits")).json()["credits_remaining"] == 3
    grace = check.credits.settings.orphan_grace_seconds

    async def back() -> bool:
        return bool((await client.get(f"/v1/users/{user_id}/credits")).json()["credits_remaining"] == 10)

    await eventually(back, timeout=grace + 10)
    # Recording it now is too late: it expired, and nothing was charged.
    (late,) = await _record(client, placed)
    assert late["status"] == 409, late
    s = await check.consistent(user_id, client)
    assert [(h["amount"], h["status"]) for h in s["holds"]] == [(7, "expired")]
    assert [e["amount"] for e in s["ledger"]] == [10]


async def test_the_fast_path_leaves_holds_past_their_deadline_to_the_credits_service(
    client: httpx.AsyncClient, check: Checker, redis_url: str, redis_cluster: bool, user_id: str
) -> None:
    """The proxy's clock and grace never decide that a hold is dead (a clock running ahead would drop
    the account for a rebuild again and again): such a hold still counts on the fast path, and the
    credits service clears it once a refused request comes to it."""
    await _user(client, check, user_id)
    namespace = check.credits.settings.redis_namespace
    short = RedisHolds(redis_client_for(redis_url, redis_cluster), namespace=namespace, ttl_seconds=1)
    try:
        assert await short.place(user_id, 7) is not None  # never recorded: its proxy "died"
        await asyncio.sleep(1 + check.credits.settings.orphan_grace_seconds + 0.5)
        assert await short.place(user_id, 5) is None  # the dead 7 still count here: 3 left
        assert await short.client.exists(*user_keys(namespace, user_id)) == 2  # nothing dropped
    finally:
        await short.aclose()
    r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 5})
    assert r.status_code == 201, r.text
    assert r.json()["credits_remaining"] == 5
    s = await check.consistent(user_id, client)
    # The dead one was recorded from its record beside it in Redis, and expired.
    assert [(h["amount"], h["status"]) for h in s["holds"]] == [(7, "expired"), (5, "held")]


async def test_500_concurrent_placements_from_two_clients_hold_exactly_the_balance(
    client: httpx.AsyncClient, check: Checker, redis_url: str, redis_cluster: bool, user_id: str
) -> None:
    """Two processes' worth of clients (separate connections) race for 10 credits, one at a time."""
    await _user(client, check, user_id)
    namespace = check.credits.settings.redis_namespace
    clients = [RedisHolds(redis_client_for(redis_url, redis_cluster), namespace=namespace) for _ in range(2)]
    try:
        outcomes = await asyncio.gather(*(clients[i % 2].place(user_id, 1) for i in range(500)))
    finally:
        for c in clients:
            await c.aclose()
    placed = [p for p in outcomes if p is not None]
    assert len(placed) == 10
    assert sorted(p.available for p in placed) == list(range(10))
    results = await _record(client, *placed)
    assert [r["status"] for r in results] == [201] * 10
    settled = await client.post(
        "/v1/reservations/batch",
        json={"items": [{"reservation_id": p.reservation_id, "action": "commit"} for p in placed]},
    )
    assert [r["charged"] for r in settled.json()["results"]] == [1] * 10
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 0 and len(s["holds"]) == 10
