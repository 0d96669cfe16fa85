"""Settling holds in batches: commits and releases (and records of holds placed in Redis) travel to
credits many per call.

One HTTP call per settlement was most of the credits service's CPU at high rates (request parsing,
routing and middleware per call, for a few microseconds of ledger work). Settlements are queued
here and sent as `POST /v1/reservations/batch`. A batch waits `linger_seconds` (the proxy's
SETTLE_LINGER_MS, 5 ms by default) for
the settlements of the requests that follow, then leaves as soon as a sending slot is free; under
load the ones that arrive while earlier batches are in flight share the next call. The wait is
after the response: at one request at a time, a call to credits per request (and the PostgreSQL
work behind it) competed with the next request for the two cores and was half of the proxy's added
latency. A caller that waits for its answer (a release before an error response) sends at once.

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
        linger_seconds: float = 0.0,
    ) -> None:
        self.credits = credits
        self.max_batch = max_batch
        self.linger_seconds = linger_seconds
        self.max_attempts = max_attempts
        self.retry_base = retry_base_seconds
        self.max_delay = max_delay_seconds
        self._slots = asyncio.Semaphore(max_inflight)
        self._pending: list[_Item] = []
        self._wake = asyncio.Event()
        self._send_now = asyncio.Event()  # cuts the linger short
        self._runner: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._retrying: dict[int, tuple[asyncio.TimerHandle, _Item]] = {}
        self._closing = False
        self._closed = False

    def submit(
        self,
        reservation_id: str,
        charged: int,
        *,
        urgent: bool = False,
        overage: int = 0,
        details: dict[str, Any] | None = None,
    ) -> asyncio.Future[dict[str, Any]]:
        """Queues a commit of `charged` (a release when 0), plus `overage` credits beyond the hold and
        the usage `details` of the ledger entry; the future gets credits' answer for it (the body the
        single endpoint returns), or the error it refused with. Urgent: someone waits for the answer,
        so the batch leaves without lingering."""
        if charged > 0:
            payload: dict[str, Any] = {
                "reservation_id": reservation_id,
                "action": "commit",
                "amount": charged,
            }
            if overage > 0:
                payload["overage"] = overage
            if details is not None:
                payload["details"] = details
        else:
            payload = {"reservation_id": reservation_id, "action": "release"}
        future = self._queue(reservation_id, payload)
        if urgent:
            self.flush()
        return future

    def extend(self, reservation_id: str, deadline_ms: int) -> asyncio.Future[dict[str, Any]]:
        """Queues moving a hold's deadline to `deadline_ms` (its request is still served); sent at once."""
        payload = {"reservation_id": reservation_id, "action": "extend", "deadline_ms": deadline_ms}
        future = self._queue(reservation_id, payload)
        self.flush()
        return future

    def flush(self) -> None:
        """Sends what is queued without waiting out the linger."""
        if self._pending:
            self._send_now.set()

    def record(self, placed: PlacedHold) -> asyncio.Future[dict[str, Any]]:
        """Queues the record of a hold placed in Redis; the future gets credits' answer (201 and the
        reservation) or the error it refused with (402: lost with Redis, 409: past its deadline).
        Settle such a hold only after this answer: before it, credits does not know the hold."""
        return self._queue(placed.reservation_id, placed.record())

    def _queue(self, reservation_id: str, payload: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        if self._runner is None and not self._closing:  # while closing, aclose sends the queue
            self._runner = loop.create_task(self._run(), name="proxy-settlements")
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        item = _Item(reservation_id, payload, future)
        if self._closed:
            _fail(item, ServiceUnavailable("The proxy is shutting down."))
            return future
        self._pending.append(item)
        self._wake.set()
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self.linger_seconds and not self._send_now.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger_seconds):
                        await self._send_now.wait()
            self._send_now.clear()
            self._wake.clear()
            while self._pending:
                await self._slots.acquire()
                if not self._pending:
                    self._slots.release()
                    break
                self._start_send()
            self._send_now.clear()  # what a flush meant to hurry has gone

    def _start_send(self) -> None:
        """Sends the next batch; the caller holds a sending slot, which the send gives back."""
        task = asyncio.get_running_loop().create_task(self._send(self._take()))
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
            except asyncio.CancelledError:
                # Only aclose cancels a send, once its time is up: these were not (known to be) applied.
                for item in batch:
                    _fail(item, ServiceUnavailable("The proxy is shutting down."))
                raise
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
            if item.attempts >= self.max_attempts or self._closing:
                _fail(item, ServiceUnavailable("The credits service is unavailable."))
                continue
            delay = min(self.retry_base * 2 ** (item.attempts - 1), self.max_delay)
            self._retrying[id(item)] = (loop.call_later(delay, self._requeue, item), item)

    def _requeue(self, item: _Item) -> None:
        self._retrying.pop(id(item), None)
        self._pending.append(item)
        self._wake.set()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Sends what is queued (within `timeout`), then stops; what could not be sent, and what
        waits to be retried after a failure, fails (its hold expires at credits)."""
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while True:
                    if self._pending:
                        await self._slots.acquire()
                        if self._pending:
                            self._start_send()
                        else:
                            self._slots.release()
                    elif self._sends:
                        await asyncio.wait(set(self._sends), return_when=asyncio.FIRST_COMPLETED)
                    else:
                        # An answered record wakes its request's settlement, which queues the commit
                        # on its next step: let it run before calling the queue empty.
                        await asyncio.sleep(0)
                        if not self._pending:
                            break
        for send in list(self._sends):
            send.cancel()
        if self._sends:
            await asyncio.wait(set(self._sends))
        for handle, item in self._retrying.values():
            handle.cancel()
            self._pending.append(item)
        self._retrying.clear()
        self._closed = True
        for item in self._pending:
            _fail(item, ServiceUnavailable("The proxy is shutting down."))
        self._pending.clear()


def _fail(item: _Item, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
        # Nobody may be waiting (a background settlement that gave up): mark it retrieved.
        item.future.exception()


__all__ = ["SettlementBatcher"]
