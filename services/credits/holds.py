"""Redis adapter: the live balance and open holds of each user, changed only through the Lua scripts.

The keys, the scripts and what their replies mean are `shared/holds/protocol.py`'s (shared with the
proxy, which places holds with the same reserve.lua); this adapter is credits' side: it keeps the
mirror of PostgreSQL (load, apply, confirm), the sweeper's deadline index, and reads what proxies owe.

The client is a standalone `redis.asyncio.Redis` or, with REDIS_CLUSTER=true,
`shared.redis_client.BoundedRedisCluster` (`shared.redis_client.redis_client` picks); cluster pipelines
(the index, `apply_many`, `confirm`) split the commands by node and route each EVALSHA by its keys' slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.holds.protocol import (
    APPLY,
    CONFIRM,
    DEFAULT_NAMESPACE,
    INDEX_SEPARATOR,
    LOAD,
    PENDING_SHARDS,
    RESERVE,
    UNLIST,
    VIEW,
    ReserveOutcome,
    Snapshot,
    apply_available,
    as_text,
    confirm_stands,
    deadline_index_key,
    load_available,
    pending_index_key,
    pending_key,
    reserve_outcome,
    shard_of,
    unlisted,
    user_key,
    user_keys,
    user_keys_with_pending,
    view_snapshot,
)
from shared.redis_client import AnyRedis, probe


class Holds:
    def __init__(
        self,
        client: AnyRedis,
        deadline_shards: int = 16,
        namespace: str = DEFAULT_NAMESPACE,
        grace_ms: int = 5000,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.deadline_shards = deadline_shards
        self.grace_ms = grace_ms

    def account_key(self, user_id: str) -> str:
        return user_key(self.namespace, user_id, "acct")

    def keys(self, user_id: str) -> list[str]:
        return user_keys(self.namespace, user_id)

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
        reply = await RESERVE(
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
        return reserve_outcome(reply)

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
        return apply_available(await APPLY(self.client, self.keys(user_id), args))

    async def apply_many(
        self, changes: Sequence[tuple[str, int | None, int | None, Sequence[str]]]
    ) -> list[int | None]:
        """`apply` for many (user_id, balance, version, ended) in one pipelined round trip; each
        script still touches one user's keys only. Returns available credits (None: not loaded)."""
        if not changes:
            return []
        replies = await APPLY.many(
            self.client,
            [
                (
                    self.keys(user_id),
                    ["" if balance is None else balance, "" if version is None else version, *ended],
                )
                for user_id, balance, version, ended in changes
            ],
        )
        return [apply_available(r) for r in replies]

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
        return load_available(await LOAD(self.client, self.keys(user_id), args))

    async def confirm(self, items: Sequence[tuple[str, str, int, str | None, str, int, bool]]) -> list[bool]:
        """items: (user_id, reservation_id, amount, idempotency_key, epoch, deadline_ms, strict);
        strict for holds placed outside this service (see confirm.lua)."""
        if not items:
            return []
        replies = await CONFIRM.many(
            self.client,
            [
                (
                    user_keys_with_pending(self.namespace, user_id) if strict else self.keys(user_id),
                    [rid, amount, key or "", epoch, deadline_ms, "strict" if strict else ""],
                )
                for user_id, rid, amount, key, epoch, deadline_ms, strict in items
            ],
        )
        return [confirm_stands(r) for r in replies]

    async def index_deadlines(self, holds: Sequence[tuple[str, str, int]]) -> None:
        """Adds persisted holds (user_id, reservation_id, deadline_ms) to the sweeper's sharded index."""
        by_shard: dict[int, dict[str | bytes, float]] = {}
        for user_id, rid, deadline_ms in holds:
            members = by_shard.setdefault(shard_of(user_id, self.deadline_shards), {})
            members[f"{user_id}{INDEX_SEPARATOR}{rid}"] = deadline_ms
        if len(by_shard) == 1:
            ((shard, members),) = by_shard.items()
            await self.client.zadd(deadline_index_key(self.namespace, shard), members)
            return
        pipe = self.client.pipeline(transaction=False)
        for shard, members in by_shard.items():
            pipe.zadd(deadline_index_key(self.namespace, shard), members)
        await pipe.execute()

    async def extend_deadlines(self, holds: Sequence[tuple[str, str, int]]) -> None:
        """Moves the deadlines of holds (user_id, reservation_id, deadline_ms) still in Redis later, in
        the user's deadline set and the sweeper's index (never earlier; a hold gone stays gone)."""
        if not holds:
            return
        pipe = self.client.pipeline(transaction=False)
        for user_id, rid, deadline_ms in holds:
            pipe.zadd(user_key(self.namespace, user_id, "deadlines"), {rid: deadline_ms}, xx=True, gt=True)
            pipe.zadd(
                deadline_index_key(self.namespace, shard_of(user_id, self.deadline_shards)),
                {f"{user_id}{INDEX_SEPARATOR}{rid}": deadline_ms},
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
        return view_snapshot(await VIEW(self.client, self.keys(user_id), [now_ms - self.grace_ms]))

    async def due_deadlines(self, shard: int, now_ms: int, limit: int = 500) -> list[tuple[str, str, str]]:
        """(member, user_id, reservation_id) of index entries at or before now_ms."""
        members = await self.client.zrangebyscore(
            deadline_index_key(self.namespace, shard), "-inf", now_ms, start=0, num=limit
        )
        out = []
        for m in members:
            member = as_text(m)
            user_id, _, rid = member.partition(INDEX_SEPARATOR)
            out.append((member, user_id, rid))
        return out

    async def drop_deadlines(self, shard: int, members: Sequence[str]) -> None:
        if members:
            await self.client.zrem(deadline_index_key(self.namespace, shard), *members)

    async def probe(self) -> None:
        """A real key operation (see `shared.redis_client.probe`), for readiness."""
        await probe(self.client, self.namespace)

    # --- what proxies owe, kept beside the holds (see shared/holds/protocol.py, PendingSettlements.drain_pending)

    def pending_key(self, user_id: str) -> str:
        return pending_key(self.namespace, user_id)

    async def pending(self, user_id: str) -> dict[str, str]:
        """The user's records of holds and settlements not yet in PostgreSQL, by field."""
        raw = await self.client.hgetall(self.pending_key(user_id))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    async def forget_pending(self, user_id: str, fields: Sequence[str]) -> None:
        if fields:
            await self.client.hdel(self.pending_key(user_id), *fields)

    async def pending_users(self, shard: int, limit: int = 200) -> list[tuple[str, str]]:
        """(user_id, score as stored) of users listed with settlements waiting, in one shard."""
        # Scores kept as Redis prints them, for unlist.lua's comparison.
        raw = await self.client.zrange(
            pending_index_key(self.namespace, shard), 0, limit - 1, withscores=True, score_cast_func=as_text
        )
        return [(as_text(member), str(score)) for member, score in raw]

    async def unlist_pending(self, shard: int, user_id: str, score: str) -> bool:
        return unlisted(
            await UNLIST(self.client, [pending_index_key(self.namespace, shard)], [user_id, score])
        )

    @property
    def pending_shards(self) -> int:
        return PENDING_SHARDS
