"""What a proxy could not deliver, left in credits' Redis beside the holds (shared/holds/fast_path.py: the
hold's record written by reserve.lua, settlements parked by `RedisHolds.park`): credits applies it
once, even past the hold's deadline, and charges a served request whose hold expired meanwhile
(what the balance no longer covers becomes `credits_owed`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from shared.holds.fast_path import RedisHolds
from shared.holds.protocol import pending_index_key, pending_key, pending_shard
from tests.conftest import eventually
from tests.support.credits_service import CreditsService


@pytest.fixture
async def short_holds(credits: CreditsService, redis_url: str) -> AsyncIterator[RedisHolds]:
    """The proxy's fast path with holds of one second."""
    holds = RedisHolds(
        aioredis.from_url(redis_url), namespace=credits.settings.redis_namespace, ttl_seconds=1
    )
    yield holds
    await holds.aclose()


async def _account(client: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/users/{user_id}/credits")
    assert r.status_code == 200, r.text
    account: dict[str, Any] = r.json()
    return account


async def _ledger(client: httpx.AsyncClient, user_id: str) -> list[tuple[str, int]]:
    data = (await client.get(f"/v1/users/{user_id}/transactions")).json()["data"]
    return sorted((e["type"], e["amount"]) for e in data)


async def test_a_hold_never_recorded_and_its_parked_commit_are_charged_once_past_the_deadline(
    client: httpx.AsyncClient, user_id: str, short_holds: RedisHolds, redis_url: str
) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    await _account(client, user_id)  # loaded in Redis
    placed = await short_holds.place(user_id, 3)
    assert placed is not None
    rid = placed.reservation_id
    # The record is beside the hold, written by the same script.
    raw = aioredis.from_url(redis_url)
    try:
        namespace = short_holds.namespace
        assert await raw.hexists(pending_key(namespace, user_id), f"h:{rid}")
        commit = {"reservation_id": rid, "action": "commit", "amount": 3}
        await short_holds.park(user_id, [(rid, commit)])
        await short_holds.park(user_id, [(rid, commit)])  # parked twice: still charged once
        await asyncio.sleep(1.5)  # past the hold's deadline: neither was ever delivered over HTTP

        async def charged() -> dict[str, Any] | None:
            account = await _account(client, user_id)
            return (
                account
                if account["credits_lifetime_used"] == 3 and account["credits_reserved"] == 0
                else None
            )

        account = await eventually(charged, timeout=15)
        assert isinstance(account, dict) and account["credits_remaining"] == 7
        assert (await client.get(f"/v1/reservations/{rid}")).json()["status"] == "committed"
        assert await _ledger(client, user_id) == [("signup_bonus", 10), ("usage", -3)]

        async def forgotten() -> bool:
            return int(await raw.exists(pending_key(namespace, user_id))) == 0

        await eventually(forgotten, timeout=5)
        await eventually(lambda: _not_listed(raw, namespace, user_id), timeout=5)
    finally:
        await raw.aclose()


async def _not_listed(raw: aioredis.Redis, namespace: str, user_id: str) -> bool:
    return await raw.zscore(pending_index_key(namespace, pending_shard(user_id)), user_id) is None


@pytest.mark.parametrize("overage", [0, 3])
async def test_a_commit_parked_after_its_hold_expired_is_charged_and_owed_beyond_the_balance(
    client: httpx.AsyncClient, user_id: str, short_holds: RedisHolds, overage: int
) -> None:
    """`overage`: what the request's reported usage cost beyond its hold, charged (owed) with it."""
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    await _account(client, user_id)
    placed = await short_holds.place(user_id, 4)
    assert placed is not None
    rid = placed.reservation_id
    r = await client.post("/v1/reservations/batch", json={"items": [placed.record()]})
    assert r.json()["results"][0]["status"] == 201

    async def expired() -> bool:
        return bool((await client.get(f"/v1/reservations/{rid}")).json()["status"] == "expired")

    await eventually(expired, timeout=15)
    # Meanwhile the user spends the whole balance.
    r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 10})
    assert r.status_code == 201, r.text
    assert (await client.post(f"/v1/reservations/{r.json()['reservation_id']}/commit")).status_code == 200
    # The served request's commit arrives late, parked by its proxy.
    item = {"reservation_id": rid, "action": "commit", "amount": 4, "overage": overage}
    await short_holds.park(user_id, [(rid, item)])

    async def charged() -> dict[str, Any] | None:
        account = await _account(client, user_id)
        return account if account["credits_lifetime_used"] == 14 + overage else None

    account = await eventually(charged, timeout=15)
    assert isinstance(account, dict)
    assert account["credits_owed"] == 4 + overage and account["credits_remaining"] == 0
    assert (await client.get(f"/v1/reservations/{rid}")).json()["status"] == "committed"
    await short_holds.park(user_id, [(rid, item)])
    await asyncio.sleep(1.0)  # parked again: nothing more
    account = await _account(client, user_id)
    assert account["credits_lifetime_used"] == 14 + overage and account["credits_owed"] == 4 + overage
