"""Group commit of new holds: concurrent reserves share one PostgreSQL transaction.

A reserve is acknowledged only after its hold row is committed. Requests that arrive while a batch is
being written form the next batch, so under load one transaction carries many holds and at low load a
hold is written at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from enum import Enum

from sqlalchemy.ext.asyncio import AsyncEngine

from services.credits import store
from services.credits.holds import Holds
from services.credits.store import NewHold

log = logging.getLogger("credits.writer")


class Persisted(Enum):
    OK = "ok"
    DUPLICATE = "duplicate"  # the idempotency key already has a reservation in PostgreSQL
    LOST = "lost"  # Redis was rebuilt meanwhile without this hold and the credits are gone


@dataclass
class _Pending:
    hold: NewHold
    epoch: str
    future: asyncio.Future[Persisted]


class HoldWriter:
    def __init__(self, engine: AsyncEngine, holds: Holds, max_batch: int) -> None:
        self._engine = engine
        self._holds = holds
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="credits-hold-writer")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, timeout=10)
            self._task = None
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError("service shutting down"))
        self._pending.clear()

    async def persist(self, hold: NewHold, epoch: str) -> Persisted:
        if self._task is None or self._closing:
            raise RuntimeError("hold writer is not running")
        future: asyncio.Future[Persisted] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(hold, epoch, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._write(batch)
            if self._closing:
                return

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            async with self._engine.begin() as conn:
                # KEY SHARE on the accounts: a concurrent rebuild (FOR UPDATE) either sees these holds or
                # loads before them, and then confirm() below restores them.
                await store.lock_accounts_key_share(conn, [p.hold.user_id for p in batch])
                inserted = await store.insert_holds(conn, [p.hold for p in batch])
            fresh = [p for p in batch if p.hold.id in inserted]
            confirmed = await self._holds.confirm(
                [(p.hold.user_id, p.hold.id, p.hold.amount, p.hold.idempotency_key, p.epoch) for p in fresh]
            )
        except Exception as exc:
            log.exception("persisting %d holds failed", len(batch))
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        ok = dict(zip((p.hold.id for p in fresh), confirmed, strict=True))
        for p in batch:
            if p.future.done():
                continue
            if p.hold.id not in ok:
                p.future.set_result(Persisted.DUPLICATE)
            else:
                p.future.set_result(Persisted.OK if ok[p.hold.id] else Persisted.LOST)
