"""Group commit: concurrent reserves share one PostgreSQL call (HoldWriter), so do concurrent commits
(CommitWriter).

A reserve is acknowledged only after its hold row is committed; a commit answers only after its
ledger entry is committed. Requests that arrive while a batch is being written form the next batch,
so under load one transaction carries many of them and at low load each is written at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

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


@dataclass
class _PendingCommit:
    reservation_id: str
    amount: int | None
    low_event: str
    future: asyncio.Future[Any]


class CommitWriter:
    """Runs concurrent commits as one `credits_commit_batch` call; each caller gets its own row."""

    def __init__(self, pool: asyncpg.Pool, threshold: int, max_batch: int) -> None:
        self._pool = pool
        self._threshold = threshold
        self._max_batch = max_batch
        self._pending: list[_PendingCommit] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._now: datetime | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="credits-commit-writer")

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

    async def commit(self, reservation_id: str, amount: int | None, now: datetime, low_event: str) -> Any:
        if self._task is None or self._closing:
            raise RuntimeError("commit writer is not running")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # One clock reading per batch is enough: the latest caller's (deadlines are checked against it).
        self._now = now
        self._pending.append(_PendingCommit(reservation_id, amount, low_event, future))
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

    async def _write(self, batch: list[_PendingCommit]) -> None:
        now = self._now
        assert now is not None
        try:
            async with self._pool.acquire() as conn:
                rows = await store.commit_batch_fast(
                    conn,
                    [p.reservation_id for p in batch],
                    [p.amount for p in batch],
                    now,
                    self._threshold,
                    [p.low_event for p in batch],
                )
        except Exception:
            # E.g. a deadlock with another process: every commit gets its own transaction instead.
            log.warning("batched commit of %d failed; committing one by one", len(batch), exc_info=True)
            for p in batch:
                try:
                    row = await store.commit_fast(
                        self._pool, p.reservation_id, p.amount, now, self._threshold, p.low_event
                    )
                except Exception as exc:
                    if not p.future.done():
                        p.future.set_exception(exc)
                else:
                    if not p.future.done():
                        p.future.set_result(row)
            return
        by_id: dict[str, list[Any]] = {}
        for row in rows:
            by_id.setdefault(str(row["reservation_id"]), []).append(row)
        for p in batch:
            if not p.future.done():
                p.future.set_result(by_id[p.reservation_id].pop(0))
