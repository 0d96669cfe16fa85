"""Expiry: holds past their deadline end in PostgreSQL first (so the ledger learns of every expiry),
then in Redis; Redis-only leftovers past the grace period are dropped. Run by the sweeper."""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime

from services.credits import metrics
from services.credits.config import CreditsSettings
from services.credits.ids import is_uuid
from services.credits.mirror import Mirror, Sync
from services.credits.stores import accounts as account_store
from services.credits.stores import reservations as reservation_store

log = logging.getLogger("credits.expiry")


class Expiry:
    def __init__(self, mirror: Mirror, settings: CreditsSettings) -> None:
        self.mirror = mirror
        self.engine, self.holds, self.clock = mirror.engine, mirror.holds, mirror.clock
        self.settings = settings

    async def expire_due(self, now: datetime | None = None, limit: int = 500) -> int:
        """Ends every hold past its deadline in PostgreSQL (the ledger learns of each), then in Redis."""
        now = now or self.clock()
        total = 0
        while True:
            async with self.engine.begin() as conn:
                expired = await reservation_store.expire_due(conn, now, limit)
                if expired:
                    await account_store.lock_accounts_key_share(conn, [r.user_id for r in expired])
            by_user: dict[str, list[str]] = defaultdict(list)
            for r in expired:
                by_user[r.user_id].append(r.id)
                metrics.CREDITS_EXPIRED.inc(r.amount)
            await self.mirror.sync([Sync(u, ended=tuple(ids)) for u, ids in by_user.items()])
            total += len(expired)
            if len(expired) < limit:
                return total

    async def sweep_redis(self, now: datetime | None = None) -> int:
        """Drops Redis holds whose deadline has passed and that PostgreSQL does not hold open: holds
        that ended while their sync to Redis failed, and holds that never reached PostgreSQL."""
        now = now or self.clock()
        cutoff_ms = int((now.timestamp() - self.settings.orphan_grace_seconds) * 1000)
        dropped = 0
        for shard in range(self.holds.deadline_shards):
            due = await self.holds.due_deadlines(shard, cutoff_ms)
            if not due:
                continue
            ids = [rid for _, _, rid in due if is_uuid(rid)]
            async with self.engine.connect() as conn:
                statuses = await reservation_store.reservation_statuses(conn, ids)
                balances = await account_store.balances_of(conn, sorted({u for _, u, _ in due}))
            by_user: dict[str, list[str]] = defaultdict(list)
            done: list[str] = []
            for member, user_id, rid in due:
                status = statuses.get(rid)
                if status == "held":
                    continue  # expire_due ends it in PostgreSQL first
                if status is None:
                    metrics.ORPHAN_HOLDS_DROPPED.inc()
                by_user[user_id].append(rid)
                done.append(member)
            for user_id, rids in by_user.items():
                balance, version = balances.get(user_id, (None, None))
                try:
                    await self.holds.apply(user_id, balance=balance, version=version, ended=rids)
                except Exception:
                    log.exception("sweeping Redis holds of %s failed", user_id)
            await self.holds.drop_deadlines(shard, done)
            dropped += len(done)
        return dropped
