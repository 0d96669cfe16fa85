"""Settling holds in batches: commits and releases (and records of holds placed in Redis) travel to
credits many per call.

One HTTP call per settlement was most of the credits service's CPU at high rates (request parsing,
routing and middleware per call, for a few microseconds of ledger work). Settlements are queued
here and sent as `POST /v1/reservations/batch`; a batch leaves as soon as a sending slot is free,
so at low load each settlement goes at once and under load the ones that arrive while earlier
batches are in flight share the next call (group commit, no timer adds latency).

Each item runs at credits through the same idempotent commit/release as the single endpoints, so a
batch sent twice (its answer lost, then retried) charges once. When credits cannot be reached or
fails, the items are retried with exponential backoff capped at `max_delay_seconds`, for about as
long as a hold lives at credits by default (600 s), so an outage of minutes still ends with every
served request charged. Only then are they given up: their holds expire back to the users at credits
(a served request then goes uncharged, never double-charged; SETTLEMENT_FAILURES counts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from shared.errors import AppError, ServiceUnavailable
from shared.redis_holds import PlacedHold

from .downstream import CreditsClient, DownstreamError

log = logging.getLogger("proxy.settlements")


@dataclass(slots=True)
class _Item:
    reservation_id: str
    payload: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]
    attempts: int = field(default=0)


class SettlementBatcher:
    def __init__(
        self,
        credits: CreditsClient,
        *,
        max_batch: int = 200,
        max_inflight: int = 4,
        max_attempts: int = 60,
        retry_base_seconds: float = 0.2,
        max_delay_seconds: float = 10.0,
    ) -> None:
        self.credits = credits
        self.max_batch = max_batch
        self.max_attempts = max_attempts
        self.retry_base = retry_base_seconds
        self.max_delay = max_delay_seconds
        self._slots = asyncio.Semaphore(max_inflight)
        self._pending: list[_Item] = []
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._retrying: dict[int, tuple[asyncio.TimerHandle, _Item]] = {}

    def submit(self, reservation_id: str, charged: int) -> asyncio.Future[dict[str, Any]]:
        """Queues a commit of `charged` (a release when 0); the future gets credits' answer for it
        (the body the single endpoint returns), or the error it refused with."""
        if charged > 0:
            payload = {"reservation_id": reservation_id, "action": "commit", "amount": charged}
        else:
            payload = {"reservation_id": reservation_id, "action": "release"}
        return self._queue(reservation_id, payload)

    def record(self, placed: PlacedHold) -> asyncio.Future[dict[str, Any]]:
        """Queues the record of a hold placed in Redis; the future gets credits' answer (201 and the
        reservation) or the error it refused with (402: lost with Redis, 409: past its deadline).
        Settle such a hold only after this answer: before it, credits does not know the hold."""
        return self._queue(placed.reservation_id, placed.record())

    def _queue(self, reservation_id: str, payload: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        if self._runner is None:
            self._runner = loop.create_task(self._run(), name="proxy-settlements")
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending.append(_Item(reservation_id, payload, future))
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                await self._slots.acquire()
                if not self._pending:
                    self._slots.release()
                    break
                batch = self._take()
                task = asyncio.get_running_loop().create_task(self._send(batch))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)

    def _take(self) -> list[_Item]:
        """Up to max_batch items, at most one per reservation (a second one waits for the next batch)."""
        batch: list[_Item] = []
        rest: list[_Item] = []
        seen: set[str] = set()
        for item in self._pending:
            if len(batch) < self.max_batch and item.reservation_id not in seen:
                seen.add(item.reservation_id)
                batch.append(item)
            else:
                rest.append(item)
        self._pending = rest
        return batch

    async def _send(self, batch: list[_Item]) -> None:
        try:
            try:
                data = await self.credits.settle_batch([item.payload for item in batch])
                results = data["results"]
                if not isinstance(results, list) or len(results) != len(batch):
                    raise ServiceUnavailable("The credits service answered a malformed batch.")
            except ServiceUnavailable:
                self._retry_or_fail(batch)
                return
            except AppError as exc:
                for item in batch:
                    _fail(item, exc)
                return
            except Exception as exc:
                log.exception("settlement batch failed")
                for item in batch:
                    _fail(item, exc)
                return
            for item, result in zip(batch, results, strict=True):
                status = result.get("status") if isinstance(result, dict) else None
                if isinstance(status, int) and 200 <= status < 300:
                    if not item.future.done():
                        item.future.set_result(result)
                elif isinstance(status, int) and status >= 500:
                    self._retry_or_fail([item])
                else:
                    _fail(item, DownstreamError(int(status or 500), result))
        finally:
            self._slots.release()

    def _retry_or_fail(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        for item in items:
            item.attempts += 1
            if item.attempts >= self.max_attempts:
                _fail(item, ServiceUnavailable("The credits service is unavailable."))
                continue
            delay = min(self.retry_base * 2 ** (item.attempts - 1), self.max_delay)
            self._retrying[id(item)] = (loop.call_later(delay, self._requeue, item), item)

    def _requeue(self, item: _Item) -> None:
        self._retrying.pop(id(item), None)
        self._pending.append(item)
        self._wake.set()

    async def aclose(self) -> None:
        """Stops sending; anything still queued fails (its hold expires at credits)."""
        for handle, item in self._retrying.values():
            handle.cancel()
            self._pending.append(item)
        self._retrying.clear()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._sends:
            await asyncio.wait(set(self._sends), timeout=5)
        for item in self._pending:
            _fail(item, ServiceUnavailable("The proxy is shutting down."))
        self._pending.clear()


def _fail(item: _Item, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
        # Nobody may be waiting (a background settlement that gave up): mark it retrieved.
        item.future.exception()


__all__ = ["SettlementBatcher"]
