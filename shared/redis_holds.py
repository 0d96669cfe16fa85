"""Holds placed straight in Redis with the credits service's own `reserve.lua` (the proxy's fast path).

The credits service owns the scripts and the key layout; this module is the one place both are named,
so the credits adapter (`services/credits/holds.py`) and the proxy's fast path cannot drift apart.

A hold placed here exists only in Redis until the credits service records it in PostgreSQL
(`POST /v1/reservations/batch`, action "hold"). Until then it behaves like a hold whose process died
mid-reserve: if it is never recorded, the first credits-service script to meet it past its deadline
plus the grace period drops the user's keys, the account is rebuilt from PostgreSQL without it, and
the credits come back; nothing reaches the ledger. Only the plain case runs here (the account is
loaded and covers the amount); everything else (an account to rebuild, too few credits, idempotency
keys, Redis unreachable) answers None and the caller goes through the credits service's HTTP API.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from redis.exceptions import NoScriptError

from shared.redis_client import REDIS_ERRORS, AnyRedis, redis_client
from shared.settings import RedisSettings

log = logging.getLogger("shared.redis_holds")

REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (*REDIS_ERRORS, OSError, TimeoutError)

DEFAULT_NAMESPACE = "credits"


def credits_script(name: str) -> str:
    """The text of one of the credits service's Lua scripts (`services/credits/lua/<name>`)."""
    return resources.files("services.credits").joinpath("lua", name).read_text(encoding="utf-8")


class LuaScript:
    """One of the credits scripts, run with EVALSHA and loaded again after a NOSCRIPT (a restarted or
    flushed Redis).

    Leaner than redis-py's `Script` on the hot path: no type checks per call, and a pipeline of calls
    is one round trip (redis-py's pipelines send SCRIPT EXISTS before every pipeline that runs a
    registered script, a second round trip each time). Only idempotent scripts may be pipelined:
    after a NOSCRIPT the whole pipeline runs again, and a Redis whose scripts were flushed part-way
    through (or a Cluster node that lost them) could have run some calls already.

    On Redis Cluster (`shared.redis_client`) EVALSHA is routed by the slot of its keys (every call
    names one user's keys, one slot); a pipeline is split by node and sent to the nodes concurrently,
    and SCRIPT LOAD goes to every master, so a NOSCRIPT on any node is mended the same way.
    """

    def __init__(self, name: str, *, idempotent: bool = False) -> None:
        self.name = name
        self.idempotent = idempotent
        self.source = credits_script(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, client: AnyRedis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        except NoScriptError:
            await client.script_load(self.source)  # type: ignore[no-untyped-call]
            return await client.evalsha(self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]

    async def many(self, client: AnyRedis, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Runs the script once per (keys, args), all in one pipelined round trip; answers in order."""
        if not self.idempotent:
            raise TypeError(f"{self.name} is not idempotent: it must not be pipelined with retries")
        if len(calls) == 1:
            keys, args = calls[0]
            return [await self(client, keys, args)]
        for attempt in range(2):
            pipe = client.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            try:
                return await pipe.execute()  # type: ignore[no-any-return]
            except NoScriptError:
                if attempt:
                    raise
                await client.script_load(self.source)  # type: ignore[no-untyped-call]
        raise AssertionError("unreachable")


def user_tag(user_id: str) -> str:
    """The hash tag of every key of one user: 16 hex digits of a digest of the id. Never the id itself:
    Redis Cluster hashes only what lies between the first `{` and the next `}`, so an id containing
    braces (`}`, `{`, `}{`) would cut the tag short and scatter the user's keys over several slots."""
    return hashlib.blake2b(user_id.encode(), digest_size=8).hexdigest()


def user_key(namespace: str, user_id: str, kind: str) -> str:
    """`<namespace>:{<user_tag>}:<kind>:<user_id>`: the tag picks the slot, the id (after it, where
    braces no longer matter) keeps the key unique and readable; `kind` is "acct", "deadlines", or
    another per-user structure that must share the user's slot."""
    return f"{namespace}:{{{user_tag(user_id)}}}:{kind}:{user_id}"


def user_keys(namespace: str, user_id: str) -> list[str]:
    """A user's account hash and deadline set (KEYS of every credits script), in one Cluster slot."""
    return [user_key(namespace, user_id, "acct"), user_key(namespace, user_id, "deadlines")]


# What a proxy owes credits, kept in credits' Redis beside the holds (see `park` and credits'
# `Ledger.drain_pending`): one hash per user, in the user's slot, so the script that places a hold
# writes its record there atomically. Fields: `h:<reservation_id>` the record of a hold placed by a
# proxy ("<amount> <deadline_ms> <epoch> <kind>", written by reserve.lua, removed by confirm.lua once
# credits has recorded it), `s:<reservation_id>` a settlement the proxy could not deliver (the JSON
# item of `POST /v1/reservations/batch`). Users with settlements waiting are listed in sharded sorted
# sets (member = user id, score = a count bumped per parking), which credits' sweeper walks.
PENDING_SHARDS = 16


def pending_key(namespace: str, user_id: str) -> str:
    """The user's hash of records and settlements not yet in PostgreSQL (same hash tag as `user_keys`)."""
    return user_key(namespace, user_id, "pending")


def pending_index_key(namespace: str, shard: int) -> str:
    return f"{namespace}:pending:{{{shard}}}"


def pending_shard(user_id: str) -> int:
    return zlib.crc32(user_id.encode()) % PENDING_SHARDS


@dataclass(frozen=True, slots=True)
class PlacedHold:
    reservation_id: str
    user_id: str
    amount: int
    available: int  # the user's credits available once this hold is placed
    epoch: str  # the account's load epoch the hold was placed under
    deadline_ms: int

    def record(self, kind: str = "usage") -> dict[str, Any]:
        """The item that asks credits to record this hold (`POST /v1/reservations/batch`)."""
        return {
            "action": "hold",
            "reservation_id": self.reservation_id,
            "user_id": self.user_id,
            "amount": self.amount,
            "epoch": self.epoch,
            "deadline_ms": self.deadline_ms,
            "kind": kind,
        }


class RedisHolds:
    """Places holds with `reserve.lua` against the credits service's Redis and key namespace."""

    def __init__(
        self,
        client: AnyRedis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        ttl_seconds: int = 600,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_ms = ttl_seconds * 1000
        self._reserve = LuaScript("reserve.lua")
        # After a failure Redis is left alone this long: every request meanwhile goes to the credits
        # service at once instead of each paying for its own failed attempt.
        self.retry_after_seconds = 1.0
        self._skip_until = 0.0
        # The longest a request waits for Redis (a connection, the handshake, the answer) before the
        # credits service takes over. Generous: a script that ran but whose answer was given up on
        # holds credits that nobody records until its deadline.
        self.answer_timeout_seconds = 3.0

    @classmethod
    def from_settings(
        cls, settings: RedisSettings, *, max_connections: int = 64, **kwargs: Any
    ) -> RedisHolds:
        """Holds in the Redis (single node or Cluster) and key namespace `settings` name."""
        # A blocking pool: a burst waits (up to a second) for one of a few connections rather than
        # opening hundreds; then the credits service takes over. A Redis that cannot be reached
        # costs at most the connect timeout (which also covers the handshake); `place` bounds the rest.
        # No socket timeout: `place` bounds each whole call (a cancelled call drops its connection),
        # and redis-py runs every send under a timeout of its own as a separate task, which showed
        # in the proxy's profile.
        client = redis_client(
            settings,
            max_connections=max_connections,
            pool_timeout=1.0,
            socket_connect_timeout=2.0,
            socket_timeout=None,
        )
        return cls(client, namespace=settings.redis_namespace, **kwargs)

    async def place(self, user_id: str, amount: int) -> PlacedHold | None:
        """Holds `amount` of the user's credits, or None when the credits service must decide."""
        if self._skip_until and time.monotonic() < self._skip_until:
            return None
        now_ms = int(time.time() * 1000)
        reservation_id = str(uuid.uuid4())
        deadline_ms = now_ms + self.ttl_ms
        try:
            async with asyncio.timeout(self.answer_timeout_seconds):
                raw = await self._reserve(
                    self.client,
                    # The record goes into the user's pending hash in the same script: what this
                    # hold is never lives only in this process (see `park`).
                    [*user_keys(self.namespace, user_id), pending_key(self.namespace, user_id)],
                    # No hold counts as dead here (cut-off 0): a hold past its deadline makes the
                    # scripts drop the account for a rebuild, and that is the credits service's to
                    # judge, by its own clock and grace period. Counted, a dead hold only makes
                    # this path refuse sooner, and the credits service then clears it.
                    (reservation_id, amount, "", "exact", deadline_ms, 0, "usage"),
                )
        except REDIS_UNAVAILABLE:
            self._skip_until = time.monotonic() + self.retry_after_seconds
            log.warning("placing a hold in Redis failed; asking the credits service", exc_info=True)
            return None
        self._skip_until = 0.0
        if int(raw[0]) != 1:
            return None
        epoch = raw[2].decode() if isinstance(raw[2], bytes) else str(raw[2])
        return PlacedHold(reservation_id, user_id, int(raw[3]), int(raw[1]), epoch, deadline_ms)

    async def park(self, user_id: str, items: Sequence[tuple[str, dict[str, Any] | None]]) -> None:
        """Leaves what this proxy could not deliver to credits in credits' Redis, for credits to
        apply (`Ledger.drain_pending`): per (reservation_id, settlement item or None). None: only
        the hold's record, which reserve.lua already wrote there, so the user is just listed. Raises
        when Redis fails (then the caller keeps the items)."""
        settlements = {f"s:{rid}": orjson.dumps(item) for rid, item in items if item is not None}
        index = pending_index_key(self.namespace, pending_shard(user_id))
        async with asyncio.timeout(self.answer_timeout_seconds):
            if settlements:
                await self.client.hset(pending_key(self.namespace, user_id), mapping=settlements)  # type: ignore[arg-type]
            # Listed after the write: a sweeper that reads the list finds the settlement.
            await self.client.zincrby(index, 1, user_id)

    async def aclose(self) -> None:
        await self.client.aclose()  # type: ignore[attr-defined]  # stubs predate redis-py 5
