"""LuaScript: EVALSHA alone, and after the script cache is emptied (a restarted Redis) it loads the
script again, whether called once or pipelined; only idempotent scripts may be pipelined."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from shared.holds.protocol import LuaScript, user_keys

NOW_MS = 1_000_000


@pytest.mark.both_redis
async def test_single_and_pipelined_calls_survive_a_script_flush(redis_client: aioredis.Redis) -> None:
    namespace = f"lua-{uuid.uuid4().hex[:6]}"
    users = ["a", "b", "c"]
    load = LuaScript("load.lua")
    for user in users:  # balance 10, one hold of 4
        await load(redis_client, user_keys(namespace, user), [10, 1, 1, f"r-{user}", 4, "", NOW_MS + 60_000])
    apply = LuaScript("apply.lua", idempotent=True)

    await redis_client.script_flush()
    ended = await apply.many(
        redis_client, [(user_keys(namespace, u), ["", "", f"r-{u}"]) for u in users]
    )  # every call failed with NOSCRIPT, the script was loaded, the pipeline ran again
    assert [int(a) for a in ended] == [10, 10, 10]
    assert (await redis_client.script_exists(apply.sha)) == [True]

    reserve = LuaScript("reserve.lua")
    await redis_client.script_flush()
    placed = await reserve(
        redis_client, user_keys(namespace, "a"), ["r-a2", 4, "", "exact", NOW_MS + 60_000, NOW_MS - 5000]
    )
    assert (int(placed[0]), int(placed[1])) == (1, 6)
    assert int(await redis_client.hget(user_keys(namespace, "a")[0], "d")) == 4
    with pytest.raises(TypeError):
        await reserve.many(redis_client, [(user_keys(namespace, "b"), ["r-b2", 1, "", "exact", 0, 0])])
