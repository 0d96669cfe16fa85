"""Background sweeper: expires holds past their deadline (PostgreSQL first, so the ledger learns of every
expiry), drops Redis-only leftovers and rebuilds the Redis state of users whose sync failed. Several processes may run it: rows are claimed with SKIP LOCKED."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from services.credits.analytics import Analytics
from services.credits.expiry import Expiry
from services.credits.mirror import Mirror
from services.credits.pending import PendingSettlements

log = logging.getLogger("credits.sweeper")

# How often the analytics' daily rollup is brought up to date (cheap when it is: one row read).
ROLL_UP_EVERY_SECONDS = 300.0


class Sweeper:
    def __init__(
        self,
        pending: PendingSettlements,
        expiry: Expiry,
        mirror: Mirror,
        analytics: Analytics,
        interval_seconds: float,
    ) -> None:
        self.pending = pending
        self.expiry = expiry
        self.mirror = mirror
        self.analytics = analytics
        self.interval = interval_seconds
        self._task: asyncio.Task[None] | None = None
        self._rolled_up_at = -ROLL_UP_EVERY_SECONDS

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="credits-sweeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep_once(self) -> tuple[int, int]:
        # Settlements proxies left in Redis first: a hold whose commit waits there must not expire.
        await self.pending.drain_listed()
        expired = await self.expiry.expire_due()
        dropped = await self.expiry.sweep_redis()
        await self.mirror.resync_failed()
        if time.monotonic() - self._rolled_up_at >= ROLL_UP_EVERY_SECONDS:
            self._rolled_up_at = time.monotonic()
            await self.analytics.roll_up()
        return expired, dropped

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed; retrying")
            await asyncio.sleep(self.interval)
