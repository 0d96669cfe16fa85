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
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import asyncpg

from services.credits.holds import Holds
from services.credits.stores import reservations as reservation_store
from services.credits.stores.reservations import NewHold, Settled

log = logging.getLogger("credits.writer")


class Persisted(Enum):
    OK = "ok"
    DUPLICATE = "duplicate"  # the idempotency key already has a reservation in PostgreSQL
    LOST = "lost"  # Redis was rebuilt meanwhile without this hold and the credits are gone


class _HasFuture(Protocol):
    future: asyncio.Future[Any]


PendingT = TypeVar("PendingT", bound=_HasFuture)


class _GroupWriter(Generic[PendingT]):
    """The group-commit loop: callers queue items; one task writes whatever queued while the previous
    batch was being written, so nothing waits for a timer at low load and batches grow under load."""

    task_name: ClassVar[str]

    def __init__(self, max_batch: int) -> None:
        self._max_batch = max_batch
        self._pending: list[PendingT] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

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

    async def _submit(self, item: PendingT) -> Any:
        if self._task is None or self._closing:
            raise RuntimeError(f"{self.task_name} is not running")
        self._pending.append(item)
        self._wake.set()
        return await item.future

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

    async def _write(self, batch: list[PendingT]) -> None:
        raise NotImplementedError


@dataclass
class _Pending:
    hold: NewHold
    epoch: str
    future: asyncio.Future[Persisted]
    # Placed in Redis by another process (the proxy's fast path): always checked against Redis.
    adopted: bool = False


class HoldWriter(_GroupWriter[_Pending]):
    task_name = "credits-hold-writer"

    def __init__(self, pool: asyncpg.Pool, holds: Holds, max_batch: int) -> None:
        super().__init__(max_batch)
        self._pool = pool
        self._holds = holds
        # The writer keeps its own connection: it must not queue for the pool behind the requests
        # that are waiting for it.
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None

    async def close(self) -> None:
        await super().close()
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(self._conn)
            self._conn = None

    async def persist(self, hold: NewHold, epoch: str, *, adopted: bool = False) -> Persisted:
        """Records a hold placed in Redis under `epoch`. DUPLICATE: a reservation with its
        idempotency key (or, for an adopted hold, its id) is already recorded; nothing was written."""
        future: asyncio.Future[Persisted] = asyncio.get_running_loop().create_future()
        persisted: Persisted = await self._submit(_Pending(hold, epoch, future, adopted))
        return persisted

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
            inserted = await reservation_store.insert_holds_fast(self._conn, [p.hold for p in batch])
            # A hold placed here needs a look in Redis only if its account was rebuilt since its
            # reserve; a hold placed elsewhere is checked always (it must really be in Redis).
            suspect = [
                p
                for p in batch
                if p.hold.id in inserted and (p.adopted or str(inserted[p.hold.id]) != p.epoch)
            ]
            confirmed = await self._holds.confirm(
                [
                    (
                        p.hold.user_id,
                        p.hold.id,
                        p.hold.amount,
                        p.hold.idempotency_key,
                        p.epoch,
                        int(p.hold.expires_at.timestamp() * 1000),
                        p.adopted,
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
    future: asyncio.Future[Settled]
    details: str | None = None  # JSON text for the usage entry


class CommitWriter(_GroupWriter[_PendingCommit]):
    """Runs concurrent commits as one `credits_commit_batch` call; each caller gets its own row."""

    task_name = "credits-commit-writer"

    def __init__(self, pool: asyncpg.Pool, threshold: int, max_batch: int) -> None:
        super().__init__(max_batch)
        self._pool = pool
        self._threshold = threshold
        self._now: datetime | None = None

    async def commit(
        self,
        reservation_id: str,
        amount: int | None,
        now: datetime,
        low_event: str,
        details: str | None = None,
    ) -> Settled:
        future: asyncio.Future[Settled] = asyncio.get_running_loop().create_future()
        if self._task is not None and not self._closing:
            # One clock reading per batch is enough: the latest caller's (deadlines are checked against it).
            self._now = now
        settled: Settled = await self._submit(
            _PendingCommit(reservation_id, amount, low_event, future, details)
        )
        return settled

    async def _write(self, batch: list[_PendingCommit]) -> None:
        now = self._now
        assert now is not None
        try:
            async with self._pool.acquire() as conn:
                rows = await reservation_store.commit_batch_fast(
                    conn,
                    [p.reservation_id for p in batch],
                    [p.amount for p in batch],
                    now,
                    self._threshold,
                    [p.low_event for p in batch],
                    [p.details for p in batch],
                )
        except Exception:
            # E.g. a deadlock with another process: every commit gets its own transaction instead.
            log.warning("batched commit of %d failed; committing one by one", len(batch), exc_info=True)
            for p in batch:
                try:
                    row = await reservation_store.commit_fast(
                        self._pool, p.reservation_id, p.amount, now, self._threshold, p.low_event, p.details
                    )
                except Exception as exc:
                    if not p.future.done():
                        p.future.set_exception(exc)
                else:
                    if not p.future.done():
                        p.future.set_result(row)
            return
        by_id: dict[str, list[Settled]] = {}
        for row in rows:
            by_id.setdefault(str(row["reservation_id"]), []).append(row)
        for p in batch:
            if not p.future.done():
                p.future.set_result(by_id[p.reservation_id].pop(0))
