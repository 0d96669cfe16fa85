"""The one place a Redis client is built: a single node, or Redis Cluster when `REDIS_CLUSTER=true`.

Both kinds share one behaviour under load: at most `max_connections` commands (or pipelines) are in
flight per client, and a caller past that waits for a free slot up to `pool_timeout` seconds, then
fails with a `redis.exceptions.ConnectionError` (a RedisError, like Redis being down), never with
redis-py's cluster `MaxConnectionsError`, which the cluster client raises at once when a node's
connections are all busy (its pool does not block).

    client = redis_client(settings)                       # REDIS_URL, REDIS_CLUSTER, REDIS_MAX_CONNECTIONS
    client = redis_client(settings, max_connections=64, pool_timeout=1.0, socket_timeout=None)
    await probe(client, settings.redis_namespace)         # /readyz: a real SET/GET, not PING
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any, TypeAlias, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from shared.settings import RedisSettings

# What Redis being unavailable can raise, of either kind of client: the cluster client's own errors
# (no node reachable, the cluster not formed) are not RedisErrors.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)

# Typed as the single-node client for both kinds: the cluster client has the same commands (and
# `aclose`), which the installed stubs, older than redis-py 5, do not declare.
AnyRedis: TypeAlias = "aioredis.Redis[Any]"


# Set while a call holds a slot of the bound: the cluster client runs some commands through itself
# (a pipeline's commands redirected by MOVED/ASK during a resharding), and those must not wait for a
# second slot while holding one (a burst of such calls would wait on each other until the timeout).
_holding: ContextVar[bool] = ContextVar("redis_cluster_slot_held", default=False)


class BoundedRedisCluster(RedisCluster):  # type: ignore[type-arg]  # stubs predate redis-py 5
    """redis-py's async cluster client with a waiting bound on commands in flight.

    Each command or pipeline holds at most one connection per node, so with no more than
    `max_connections` of them in flight no node's pool (sized `max_connections`) can run out:
    a burst queues here instead of failing with MaxConnectionsError.
    """

    def __init__(self, *args: Any, pool_timeout: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight = asyncio.Semaphore(kwargs.get("max_connections", 100))
        self._pool_timeout = pool_timeout

    @contextlib.asynccontextmanager
    async def bounded(self) -> AsyncIterator[None]:
        if _holding.get():
            yield
            return
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._in_flight.acquire()
        except TimeoutError:
            raise RedisConnectionError(
                f"no free Redis Cluster connection within {self._pool_timeout} s"
            ) from None
        token = _holding.set(True)
        try:
            yield
        finally:
            _holding.reset(token)
            self._in_flight.release()

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.bounded():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # raises, as redis-py does
        return _BoundedPipeline(self, transaction)  # type: ignore[call-arg]  # stubs predate redis-py 5


class _BoundedPipeline(ClusterPipeline):  # type: ignore[type-arg]
    cluster_client: BoundedRedisCluster

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        async with self.cluster_client.bounded():
            return await super().execute(raise_on_error, allow_redirections)


def redis_client(
    settings: RedisSettings,
    *,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
    **connection_kwargs: Any,
) -> AnyRedis:
    """A client for `settings.redis_url`: `BoundedRedisCluster` when `settings.redis_cluster`, else a
    `redis.asyncio.Redis` on a blocking pool. `max_connections` is per node (default
    REDIS_MAX_CONNECTIONS); further commands wait up to `pool_timeout` (REDIS_POOL_TIMEOUT_SECONDS)."""
    limit = max_connections or settings.redis_max_connections
    wait = settings.redis_pool_timeout_seconds if pool_timeout is None else pool_timeout
    if settings.redis_cluster:
        cluster = cast(Any, BoundedRedisCluster).from_url(
            settings.redis_url, max_connections=limit, pool_timeout=wait, **connection_kwargs
        )
        return cast("aioredis.Redis[Any]", cluster)
    pool: aioredis.BlockingConnectionPool[Any] = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=limit, timeout=wait, **connection_kwargs
    )
    # from_pool: closing the client closes the pool (the stubs predate redis-py 5).
    return aioredis.Redis.from_pool(pool)  # type: ignore[attr-defined,no-any-return]


async def probe(client: AnyRedis, namespace: str) -> None:
    """Readiness: a SET and GET of a short-lived key under `namespace`, which fails where a PING
    would not: a cluster that is down or does not cover the key's slot, a single-node client
    against a cluster node (also checked outright: its keys elsewhere would answer MOVED)."""
    if not isinstance(client, RedisCluster):
        # A single-node client works against a cluster node only for the slots that node serves:
        # say so whatever slot the key below happens to hash to.
        info = await client.info("cluster")
        if info.get("cluster_enabled"):
            raise RuntimeError("REDIS_URL names a Redis Cluster node but REDIS_CLUSTER is not true")
    token = secrets.token_hex(8)
    key = f"{namespace}:readyz:{token}"
    await client.set(key, token, px=10_000)
    found = await client.get(key)
    if found is None or (found.decode() if isinstance(found, bytes) else str(found)) != token:
        raise RuntimeError(f"Redis did not return the value just written to {key}")
