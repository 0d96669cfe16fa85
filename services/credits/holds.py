"""Redis adapter: the live balance and open holds of each user, changed only through the Lua scripts.

Keys (every key of a user carries the hash tag `{<tag>}`, `tag` = 16 hex digits of a digest of the user
id (`shared.redis_holds.user_tag`), so each script touches one slot and runs unchanged on Redis Cluster
whatever characters the id holds; the id itself follows the kind, where braces no longer count):

- `credits:{<tag>}:acct:<user_id>` — one hash per user: `b` balance (= PostgreSQL ledger sum at version `v`),
  `d` credits held, `v` account version, `e` load epoch (= accounts.redis_epoch), `h:<reservation_id>`
  held credits, `i:<idempotency_key>` reservation id, `k:<reservation_id>` its idempotency key. Its
  presence is the "loaded" marker: a missing hash is never read as zero; it means "rebuild from PostgreSQL".
- `credits:{<tag>}:deadlines:<user_id>` — the user's open holds scored by deadline (ms). A hold still there
  past deadline + grace missed its end (its process died before persisting it, or after a commit or
  release but before the sync here, leaving the balance stale too): a script that meets one drops
  the user's keys, and the account is rebuilt from PostgreSQL.
- `credits:deadlines:{<n>}` — sharded sorted sets (score = deadline, member = `user_id<US>reservation_id`)
  of persisted holds, written once per group commit; the sweeper walks every shard after the deadline
  to bring Redis back in line with PostgreSQL where a post-commit sync was lost (e.g. the process died
  after a PostgreSQL commit). Each shard is its own hash tag (slot), so on Redis Cluster the index is
  spread over the nodes and no single key takes every write; every command on it names one shard.
  Entries leave at their deadline (not at commit, which would cost a command per commit), so the index
  holds about reserve rate x TTL members.

Every script touches only the two keys of one user (one hash slot). The client is a standalone
`redis.asyncio.Redis` or, with REDIS_CLUSTER=true, `shared.redis_client.BoundedRedisCluster`
(`shared.redis_client.redis_client` picks); cluster pipelines (the index, `apply_many`, `confirm`)
split the commands by node and route each EVALSHA by its keys' slot.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.redis_client import AnyRedis, probe
from shared.redis_holds import (
    PENDING_SHARDS,
    LuaScript,
    pending_index_key,
    pending_key,
    user_keys,
)

SEPARATOR = "\x1f"  # user ids never contain control characters


@dataclass(frozen=True)
class ReserveOutcome:
    status: int  # 1 held, 0 insufficient, 2 idempotent replay, -1 not loaded
    available: int
    epoch: str
    held: int
    existing_id: str | None = None


@dataclass(frozen=True)
class Snapshot:
    balance: int
    held: int
    version: int  # the account version `balance` reflects

    @property
    def available(self) -> int:
        # Never below zero: only a charge counted twice (a lost commit sync overtaken by a later
        # sync, until the sweeper or the hold's deadline mends it) could take it there.
        return max(self.balance - self.held, 0)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Holds:
    def __init__(
        self,
        client: AnyRedis,
        deadline_shards: int = 16,
        namespace: str = "credits",
        grace_ms: int = 5000,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.deadline_shards = deadline_shards
        self.grace_ms = grace_ms
        # Sent as EVALSHA; a script is loaded again only after a NOSCRIPT.
        self._reserve = LuaScript("reserve.lua")
        self._apply = LuaScript("apply.lua", idempotent=True)
        self._load = LuaScript("load.lua")
        self._confirm = LuaScript("confirm.lua", idempotent=True)
        self._view = LuaScript("view.lua")
        self._unlist = LuaScript("unlist.lua")

    def account_key(self, user_id: str) -> str:
        return user_keys(self.namespace, user_id)[0]

    def keys(self, user_id: str) -> list[str]:
        return user_keys(self.namespace, user_id)

    def deadline_key(self, shard: int) -> str:
        return f"{self.namespace}:deadlines:{{{shard}}}"

    def shard_of(self, user_id: str) -> int:
        return zlib.crc32(user_id.encode()) % self.deadline_shards

    async def reserve(
        self,
        user_id: str,
        reservation_id: str,
        amount: int,
        idempotency_key: str | None,
        deadline_ms: int,
        now_ms: int,
        *,
        up_to: bool = False,
    ) -> ReserveOutcome:
        raw = await self._reserve(
            self.client,
            self.keys(user_id),
            [
                reservation_id,
                amount,
                idempotency_key or "",
                "upto" if up_to else "exact",
                deadline_ms,
                now_ms - self.grace_ms,
            ],
        )
        status = int(raw[0])
        if status == 2:
            return ReserveOutcome(2, 0, _s(raw[2]), 0, existing_id=_s(raw[1]))
        return ReserveOutcome(status, int(raw[1]), _s(raw[2]) if raw[2] is not None else "", int(raw[3]))

    async def apply(
        self,
        user_id: str,
        *,
        balance: int | None = None,
        version: int | None = None,
        ended: Sequence[str] = (),
    ) -> int | None:
        """Reflects a committed PostgreSQL change. Returns available credits, or None if not loaded."""
        args: list[Any] = ["" if balance is None else balance, "" if version is None else version, *ended]
        result = int(await self._apply(self.client, self.keys(user_id), args))
        return None if result == -1 else result

    async def apply_many(
        self, changes: Sequence[tuple[str, int | None, int | None, Sequence[str]]]
    ) -> list[int | None]:
        """`apply` for many (user_id, balance, version, ended) in one pipelined round trip; each
        script still touches one user's keys only. Returns available credits (None: not loaded)."""
        if not changes:
            return []
        replies = await self._apply.many(
            self.client,
            [
                (
                    self.keys(user_id),
                    ["" if balance is None else balance, "" if version is None else version, *ended],
                )
                for user_id, balance, version, ended in changes
            ],
        )
        return [None if int(r) == -1 else int(r) for r in replies]

    async def load(
        self,
        user_id: str,
        balance: int,
        version: int,
        epoch: int,
        holds: Sequence[tuple[str, int, str | None, int]],
    ) -> int:
        """holds: (reservation_id, amount, idempotency_key, deadline_ms)."""
        args: list[Any] = [balance, version, epoch]
        for rid, amount, key, deadline_ms in holds:
            args += [rid, amount, key or "", deadline_ms]
        return int(await self._load(self.client, self.keys(user_id), args))

    async def confirm(self, items: Sequence[tuple[str, str, int, str | None, str, int, bool]]) -> list[bool]:
        """items: (user_id, reservation_id, amount, idempotency_key, epoch, deadline_ms, strict);
        strict for holds placed outside this service (see confirm.lua)."""
        if not items:
            return []
        results = await self._confirm.many(
            self.client,
            [
                (
                    [*self.keys(user_id), self.pending_key(user_id)] if strict else self.keys(user_id),
                    [rid, amount, key or "", epoch, deadline_ms, "strict" if strict else ""],
                )
                for user_id, rid, amount, key, epoch, deadline_ms, strict in items
            ],
        )
        return [int(r[0]) == 1 for r in results]

    async def index_deadlines(self, holds: Sequence[tuple[str, str, int]]) -> None:
        """Adds persisted holds (user_id, reservation_id, deadline_ms) to the sweeper's sharded index."""
        by_shard: dict[int, dict[str | bytes, float]] = {}
        for user_id, rid, deadline_ms in holds:
            by_shard.setdefault(self.shard_of(user_id), {})[f"{user_id}{SEPARATOR}{rid}"] = deadline_ms
        if len(by_shard) == 1:
            ((shard, members),) = by_shard.items()
            await self.client.zadd(self.deadline_key(shard), members)
            return
        pipe = self.client.pipeline(transaction=False)
        for shard, members in by_shard.items():
            pipe.zadd(self.deadline_key(shard), members)
        await pipe.execute()

    async def extend_deadlines(self, holds: Sequence[tuple[str, str, int]]) -> None:
        """Moves the deadlines of holds (user_id, reservation_id, deadline_ms) still in Redis later, in
        the user's deadline set and the sweeper's index (never earlier; a hold gone stays gone)."""
        if not holds:
            return
        pipe = self.client.pipeline(transaction=False)
        for user_id, rid, deadline_ms in holds:
            pipe.zadd(self.keys(user_id)[1], {rid: deadline_ms}, xx=True, gt=True)
            pipe.zadd(
                self.deadline_key(self.shard_of(user_id)),
                {f"{user_id}{SEPARATOR}{rid}": deadline_ms},
                gt=True,
            )
        await pipe.execute()

    async def version(self, user_id: str) -> int | None:
        """The account version the loaded balance reflects, or None if not loaded."""
        raw = await self.client.hget(self.account_key(user_id), "v")
        return None if raw is None else int(raw)

    async def is_loaded(self, user_id: str) -> bool:
        return bool(await self.client.exists(self.account_key(user_id)))

    async def snapshot(self, user_id: str, now_ms: int) -> Snapshot | None:
        """None if not loaded (or dropped for a hold past its deadline, see view.lua)."""
        raw = await self._view(self.client, self.keys(user_id), [now_ms - self.grace_ms])
        if not raw:
            return None
        return Snapshot(int(raw[0]), int(raw[1]), int(raw[2]))

    async def due_deadlines(self, shard: int, now_ms: int, limit: int = 500) -> list[tuple[str, str, str]]:
        """(member, user_id, reservation_id) of index entries at or before now_ms."""
        members = await self.client.zrangebyscore(
            self.deadline_key(shard), "-inf", now_ms, start=0, num=limit
        )
        out = []
        for m in members:
            member = _s(m)
            user_id, _, rid = member.partition(SEPARATOR)
            out.append((member, user_id, rid))
        return out

    async def drop_deadlines(self, shard: int, members: Sequence[str]) -> None:
        if members:
            await self.client.zrem(self.deadline_key(shard), *members)

    async def probe(self) -> None:
        """A real key operation (see `shared.redis_client.probe`), for readiness."""
        await probe(self.client, self.namespace)

    # --- what proxies owe, kept beside the holds (see shared/redis_holds.py, Ledger.drain_pending)

    def pending_key(self, user_id: str) -> str:
        return pending_key(self.namespace, user_id)

    async def pending(self, user_id: str) -> dict[str, str]:
        """The user's records of holds and settlements not yet in PostgreSQL, by field."""
        raw = await self.client.hgetall(self.pending_key(user_id))
        return {_s(k): _s(v) for k, v in raw.items()}

    async def forget_pending(self, user_id: str, fields: Sequence[str]) -> None:
        if fields:
            await self.client.hdel(self.pending_key(user_id), *fields)

    async def pending_users(self, shard: int, limit: int = 200) -> list[tuple[str, str]]:
        """(user_id, score as stored) of users listed with settlements waiting, in one shard."""
        # Scores kept as Redis prints them, for unlist.lua's comparison.
        raw = await self.client.zrange(
            pending_index_key(self.namespace, shard), 0, limit - 1, withscores=True, score_cast_func=_s
        )
        return [(_s(member), str(score)) for member, score in raw]

    async def unlist_pending(self, shard: int, user_id: str, score: str) -> bool:
        return (
            int(await self._unlist(self.client, [pending_index_key(self.namespace, shard)], [user_id, score]))
            == 1
        )

    @property
    def pending_shards(self) -> int:
        return PENDING_SHARDS
