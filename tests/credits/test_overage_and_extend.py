"""Two things the proxy needs so that every served request is paid for (docs/api.md, Proxy "What is charged"):

- a commit's `overage`: the credits a request cost beyond its hold (its reported usage exceeded the
  estimate) are charged too: what is available is taken, the rest recorded as owed, once;
- the batch action `extend`: a hold whose request is still being served does not lapse.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
from redis.asyncio import Redis

from shared.holds.protocol import user_tag
from tests.credits.helpers import Checker


async def _user(client: httpx.AsyncClient, user_id: str) -> None:
    r = await client.post("/v1/users", json={"user_id": user_id})
    assert r.status_code == 201, r.text


async def _hold(client: httpx.AsyncClient, user_id: str, amount: int, ttl: int | None = None) -> str:
    body: dict[str, object] = {"user_id": user_id, "amount": amount}
    if ttl is not None:
        body["ttl_seconds"] = ttl
    r = await client.post("/v1/reservations", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["reservation_id"])


async def test_an_overage_takes_what_is_available_and_records_the_rest_as_owed_once(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await _user(client, user_id)  # 10 signup credits
    served = await _hold(client, user_id, 4)
    other = await _hold(client, user_id, 3)  # another request's hold: not to be overdrawn
    r = await client.post(f"/v1/reservations/{served}/commit", json={"amount": 4, "overage": 5})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "reservation_id": served,
        "charged": 4,
        "overage": 5,
        "owed": 2,
        "refunded": 0,
        "credits_remaining": 0,
    }
    # Delivered again (its answer lost): nothing more is taken or owed.
    again = await client.post(f"/v1/reservations/{served}/commit", json={"amount": 4, "overage": 5})
    assert again.status_code == 200 and again.json()["charged"] == 4
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 3  # 10 - 4 - 3; the other hold's 3 still covered
    assert s["account"]["credits_owed"] == 2
    usage = sorted(-e["amount"] for e in s["ledger"] if e["type"] == "usage")
    assert usage == [3, 4]
    # The other request's hold is intact and can still be committed in full.
    r = await client.post(f"/v1/reservations/{other}/commit", json={})
    assert r.status_code == 200 and r.json()["charged"] == 3
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 0


async def test_a_batch_commit_carries_its_overage_and_details_are_accepted(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await _user(client, user_id)
    served = await _hold(client, user_id, 2)
    details = {
        "operation": "chat.completions",
        "model": "gpt-4o-mini",
        "input_tokens": 1200,
        "output_tokens": 3,
        "upstream_cost_usd": 0.00018,
    }
    item = {"reservation_id": served, "action": "commit", "amount": 2, "overage": 3, "details": details}
    r = await client.post("/v1/reservations/batch", json={"items": [item]})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert (result["status"], result["charged"], result["overage"], result["owed"]) == (200, 2, 3, 0)
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 5 and s["account"]["credits_owed"] == 0


async def test_the_public_commit_still_refuses_more_than_was_reserved(
    client: httpx.AsyncClient, user_id: str
) -> None:
    await _user(client, user_id)
    rid = await _hold(client, user_id, 2)
    r = await client.post(f"/v1/reservations/{rid}/commit", json={"amount": 3})
    assert r.status_code == 400, r.text


async def test_an_extended_hold_outlives_its_ttl_and_an_ended_one_is_not_revived(
    client: httpx.AsyncClient, check: Checker, user_id: str, redis_url: str
) -> None:
    await _user(client, user_id)
    served = await _hold(client, user_id, 2, ttl=2)
    ended = await _hold(client, user_id, 1, ttl=2)
    assert (await client.post(f"/v1/reservations/{ended}/release")).status_code == 200
    deadline_ms = int(time.time() * 1000) + 60_000
    items = [
        {"reservation_id": served, "action": "extend", "deadline_ms": deadline_ms},
        {"reservation_id": ended, "action": "extend", "deadline_ms": deadline_ms},
        {"reservation_id": str(uuid.uuid4()), "action": "extend", "deadline_ms": deadline_ms},
    ]
    r = await client.post("/v1/reservations/batch", json={"items": items})
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == [200, 409, 409]
    redis = Redis.from_url(redis_url)
    try:
        # The service's key namespace is its own: find the user's deadline set by its hash tag
        # (see shared.holds.protocol.user_key).
        found = [
            key
            async for key in redis.scan_iter(match=f"*:{{{user_tag(user_id)}}}:deadlines:{user_id}")
            if await redis.zscore(key, served) is not None
        ]
        assert found, "the hold's deadline is in Redis"
        assert await redis.zscore(found[0], served) == deadline_ms
        assert await redis.zscore(found[0], ended) is None  # not revived
    finally:
        await redis.aclose()
    await asyncio.sleep(3.5)  # past the 2 s TTL, with the sweeper running
    r = await client.post(f"/v1/reservations/{served}/commit", json={"amount": 2})
    assert r.status_code == 200, r.text
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 8
