"""Redis Cluster support: a user's keys share one slot whatever the id, the cluster client waits for a
connection instead of failing under a burst, and readiness proves a real key operation works."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MaxConnectionsError

from shared.holds.fast_path import RedisHolds
from shared.holds.protocol import user_keys
from shared.redis_client import BoundedRedisCluster, probe, redis_client
from shared.settings import RedisSettings

BRACED_IDS = ["}", "{", "}{", "{}", "a}b{c", "}user{", "{x}", "{{", "}}", "plain", "ユーザー{1}"]


@pytest.mark.parametrize("user_id", BRACED_IDS)
def test_every_key_of_a_user_is_in_one_slot_whatever_the_id(user_id: str) -> None:
    keys = user_keys("credits", user_id)
    assert len({key_slot(k.encode()) for k in keys}) == 1, keys
    # ... and the id still tells users apart (the digest only picks the slot).
    assert all(user_id in k for k in keys)
    assert user_keys("credits", user_id + "x")[0] != keys[0]


def test_users_spread_over_the_slots() -> None:
    slots = {key_slot(user_keys("credits", f"u-{i}")[0].encode()) for i in range(1000)}
    assert len(slots) > 900  # not one slot for all (as a fixed or empty tag would give)


def test_a_namespace_with_braces_is_refused() -> None:
    with pytest.raises(ValueError, match="REDIS_NAMESPACE"):
        RedisSettings(redis_namespace="credits{x}")


async def test_a_burst_waits_for_cluster_connections_instead_of_failing(redis_cluster_url: str) -> None:
    keys = [f"burst-{uuid.uuid4().hex}" for _ in range(300)]
    plain = RedisCluster.from_url(redis_cluster_url, max_connections=4)
    try:
        with pytest.raises(MaxConnectionsError):  # redis-py's own pool does not wait
            await asyncio.gather(*(plain.set(k, 1) for k in keys))
    finally:
        await plain.aclose()
    client = redis_client(
        RedisSettings(redis_url=redis_cluster_url, redis_cluster=True, redis_max_connections=4)
    )
    try:
        assert isinstance(client, BoundedRedisCluster)
        assert all(await asyncio.gather(*(client.set(k, 2) for k in keys)))
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.incr(k)
        piped = asyncio.gather(*(client.get(k) for k in keys))  # pipelines share the same bound
        assert await pipe.execute() == [3] * len(keys)
        assert set(await piped) <= {b"2", b"3"}
        assert await client.delete(*keys) == len(keys)
    finally:
        await client.aclose()


async def test_readiness_fails_for_a_single_node_client_against_a_cluster(redis_cluster_url: str) -> None:
    single = aioredis.from_url(redis_cluster_url)
    try:
        await single.ping()  # what /readyz checked before: fine
        with pytest.raises(RuntimeError, match="REDIS_CLUSTER"):
            await probe(single, "credits")
    finally:
        await single.aclose()
    cluster = redis_client(RedisSettings(redis_url=redis_cluster_url, redis_cluster=True))
    try:
        for _ in range(10):  # keys in slots of every node
            await probe(cluster, "credits")
    finally:
        await cluster.aclose()


async def test_an_unreachable_cluster_sends_the_proxy_to_credits_instead_of_failing() -> None:
    """The cluster client's own errors (no node reachable) are not RedisErrors: the fast path must
    still answer None (credits' HTTP reserve decides) rather than fail the request."""
    holds = RedisHolds.from_settings(
        RedisSettings(redis_url=f"redis://127.0.0.1:{_closed_port()}/0", redis_cluster=True)
    )
    try:
        assert await holds.place("someone", 1) is None
    finally:
        await holds.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
