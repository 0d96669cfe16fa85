"""User ids with braces, end to end (create the user, chat through the proxy with a hold placed in
Redis, commit, balance) on a single Redis node and on Redis Cluster. Before the user's hash tag was a
digest of the id, an id with `}` put the user's account hash and deadline set in two slots: the
cluster refused every script with CROSSSLOT."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import httpx
import pytest
from prometheus_client import REGISTRY
from redis.crc import key_slot

from shared.holds.protocol import user_keys
from tests.conftest import redis_client_for
from tests.proxy.conftest import ADMIN, INTERNAL, sdk_for
from tests.support.proxy_service import RunningProxy

pytestmark = pytest.mark.both_redis


@pytest.mark.parametrize("shape", ["}{", "}", "{", "{}", "}x{y}"])
async def test_braced_user_ids_are_charged_end_to_end(  # type: ignore[no-untyped-def]
    proxy: RunningProxy, credits_url, redis_url, redis_cluster, shape: str
) -> None:
    user = f"{shape}u-{uuid.uuid4().hex[:8]}{shape}"
    path = f"/v1/users/{quote(user, safe='')}"
    async with httpx.AsyncClient(base_url=credits_url, timeout=30) as http:
        r = await http.post("/v1/users", json={"user_id": user}, headers=INTERNAL)
        assert r.status_code == 201, r.text
        r = await http.post(
            f"/v1/admin/users/{quote(user, safe='')}/grants",
            json={"credits": 5, "reason": "t"},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        assert (await http.get(f"{path}/credits", headers=INTERNAL)).json()["credits_remaining"] == 15

        sdk = sdk_for(proxy, user)
        placed_in_redis = _placed_in_redis()
        for _ in range(4):
            reply = await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
        assert _placed_in_redis() - placed_in_redis == 4  # the fast path, not credits' HTTP fallback

        async def settled() -> dict[str, int]:
            return dict((await http.get(f"{path}/credits", headers=INTERNAL)).json())

        from tests.conftest import eventually

        account = await eventually(
            lambda: _when(settled(), lambda a: a["credits_reserved"] == 0 and a["credits_remaining"] == 11)
        )
        assert account["credits_lifetime_used"] == 4  # type: ignore[index]
        rows = (await http.get(f"{path}/transactions", headers=INTERNAL)).json()["data"]
        assert [r["amount"] for r in rows if r["type"] == "usage"] == [-1, -1, -1, -1]

    # The live balance is in the user's Redis keys, both in one slot (on the cluster: one node).
    redis = redis_client_for(redis_url, redis_cluster)
    try:
        acct, deadlines = user_keys(proxy.settings.redis_namespace, user)
        assert key_slot(acct.encode()) == key_slot(deadlines.encode())
        assert int(await redis.hget(acct, "b")) == 15 - 4
        assert int(await redis.hget(acct, "d")) == 0
    finally:
        await redis.aclose()


def _placed_in_redis() -> float:
    return REGISTRY.get_sample_value("proxy_holds_placed_total", {"via": "redis"}) or 0.0


async def _when(pending, predicate):  # type: ignore[no-untyped-def]
    value = await pending
    return value if predicate(value) else None
