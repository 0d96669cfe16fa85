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

import asyncpg

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
    def __init__(self, pool: asyncpg.Pool, holds: Holds, max_batch: int) -> None:
        self._pool = pool
        self._holds = holds
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # The writer keeps its own connection: it must not queue for the pool behind the requests
        # that are waiting for it.
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None

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
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(self._conn)
            self._conn = None

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
            # The sweeper's index first: a hold that reaches PostgreSQL is always findable after its deadline.
            await self._holds.index_deadlines(
                [(p.hold.user_id, p.hold.id, int(p.hold.expires_at.timestamp() * 1000)) for p in batch]
            )
            if self._conn is None:
                self._conn = await self._pool.acquire()
            # One call: KEY SHARE on the accounts (a concurrent rebuild, FOR UPDATE, either sees these
            # holds or loads before them, and then confirm() below restores them), then the insert.
            inserted = await store.insert_holds_fast(self._conn, [p.hold for p in batch])
            # Only a hold whose account was rebuilt since its reserve needs a look in Redis.
            suspect = [p for p in batch if p.hold.id in inserted and str(inserted[p.hold.id]) != p.epoch]
            confirmed = await self._holds.confirm(
                [
                    (
                        p.hold.user_id,
                        p.hold.id,
                        p.hold.amount,
                        p.hold.idempotency_key,
                        p.epoch,
                        int(p.hold.expires_at.timestamp() * 1000),
                    )
                    for p in suspect
                ]
            )
        except Exception as exc:
            log.exception("persisting %d holds failed", len(batch))
            await self._drop_connection()
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        lost = {p.hold.id for p, ok in zip(suspect, confirmed, strict=True) if not ok}
        for p in batch:
            if p.future.done():
                continue
            if p.hold.id not in inserted:
                p.future.set_result(Persisted.DUPLICATE)
            else:
                p.future.set_result(Persisted.LOST if p.hold.id in lost else Persisted.OK)
