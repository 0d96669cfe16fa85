"""Redis adapter: the live balance and open holds of each user, changed only through the Lua scripts.

Keys (every key of a user carries the hash tag `{<user_id>}`, so each script touches one slot and runs
unchanged on Redis Cluster):

- `credits:{<user_id>}:acct` — one hash per user: `b` balance (= PostgreSQL ledger sum at version `v`),
  `d` credits held, `v` account version, `e` load epoch, `h:<reservation_id>` held credits,
  `i:<idempotency_key>` reservation id, `k:<reservation_id>` its idempotency key. Its presence is the "loaded" marker: a missing hash is never read
  as zero; it means "rebuild from PostgreSQL".
- `credits:deadlines:{<n>}` — sharded sorted sets (score = deadline in ms, member = `user_id<US>reservation_id`)
  that let the sweeper find holds living only in Redis (a reserve whose process died before persisting it).
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

SEPARATOR = "\x1f"  # user ids never contain control characters


def _script(name: str) -> str:
    return resources.files("services.credits").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True)
class ReserveOutcome:
    status: int  # 1 held, 0 insufficient, 2 idempotent replay, -1 not loaded
    available: int
    epoch: str
    held: int
    existing_id: str | None = None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Holds:
    def __init__(
        self, client: aioredis.Redis[Any], deadline_shards: int = 16, namespace: str = "credits"
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.deadline_shards = deadline_shards
        # Registered once; redis-py sends EVALSHA and loads the script again only after a NOSCRIPT.
        self._reserve = client.register_script(_script("reserve.lua"))
        self._apply = client.register_script(_script("apply.lua"))
        self._load = client.register_script(_script("load.lua"))
        self._confirm = client.register_script(_script("confirm.lua"))

    def account_key(self, user_id: str) -> str:
        return f"{self.namespace}:{{{user_id}}}:acct"

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
        *,
        up_to: bool = False,
    ) -> ReserveOutcome:
        # The deadline goes in first (same round trip): if this process dies right after the script,
        # the sweeper still finds the hold and drops it once it is past its deadline.
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(
            self.deadline_key(self.shard_of(user_id)), {f"{user_id}{SEPARATOR}{reservation_id}": deadline_ms}
        )
        await self._reserve(
            keys=[self.account_key(user_id)],
            args=[reservation_id, amount, idempotency_key or "", "upto" if up_to else "exact"],
            client=pipe,
        )
        _, raw = await pipe.execute()
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
        args: list[Any] = ["" if balance is None else balance, "" if version is None else version]
        args += list(ended)
        if not ended:
            result = int(await self._apply(keys=[self.account_key(user_id)], args=args))
        else:
            # Ended holds leave the deadline index in the same round trip.
            pipe = self.client.pipeline(transaction=False)
            await self._apply(keys=[self.account_key(user_id)], args=args, client=pipe)
            pipe.zrem(
                self.deadline_key(self.shard_of(user_id)),
                *(f"{user_id}{SEPARATOR}{rid}" for rid in ended),
            )
            result = int((await pipe.execute())[0])
        return None if result == -1 else result

    async def load(
        self, user_id: str, balance: int, version: int, holds: Sequence[tuple[str, int, str | None]]
    ) -> int:
        args: list[Any] = [balance, version, secrets.token_hex(8)]
        for rid, amount, key in holds:
            args += [rid, amount, key or ""]
        return int(await self._load(keys=[self.account_key(user_id)], args=args))

    async def confirm(self, items: Sequence[tuple[str, str, int, str | None, str]]) -> list[bool]:
        """items: (user_id, reservation_id, amount, idempotency_key, epoch). One pipelined round trip."""
        if not items:
            return []
        pipe = self.client.pipeline(transaction=False)
        for user_id, rid, amount, key, epoch in items:
            await self._confirm(
                keys=[self.account_key(user_id)], args=[rid, amount, key or "", epoch], client=pipe
            )
        results = await pipe.execute()
        return [int(r[0]) == 1 for r in results]

    async def is_loaded(self, user_id: str) -> bool:
        return bool(await self.client.exists(self.account_key(user_id)))

    async def snapshot(self, user_id: str) -> tuple[int, int] | None:
        """(balance, held) or None if not loaded."""
        b, d = await self.client.hmget(self.account_key(user_id), ["b", "d"])
        if b is None or d is None:
            return None
        return int(b), int(d)

    async def due_deadlines(self, shard: int, now_ms: int, limit: int = 500) -> list[tuple[str, str, str]]:
        """(member, user_id, reservation_id) of deadline entries at or before now_ms."""
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

    async def ping(self) -> None:
        await self.client.ping()
