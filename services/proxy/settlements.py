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

With a `parker` (the proxy's holds in credits' Redis), what cannot be delivered does not stay in this
process at all: a batch that fails to reach credits, and whatever is still queued when the proxy
stops, is parked in credits' Redis (`RedisHolds.park`), where credits applies it once it is back
(its `PendingSettlements.drain_pending`); its future fails with `SettlementParked`. Only if Redis
fails too are the items retried from memory as above. `in_trouble` tells the proxy to stop placing holds in Redis
until credits answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import AppError, ServiceUnavailable
from shared.holds.fast_path import PlacedHold

from .downstream import CreditsClient, DownstreamError

log = logging.getLogger("proxy.settlements")

# Leaves items for credits in Redis: (user_id, [(reservation_id, settlement item, or None for a
# hold's record, which is there already)]). Raises when it cannot.
Parker = Callable[[str, Sequence[tuple[str, dict[str, Any] | None]]], Awaitable[None]]


class SettlementParked(Exception):
    """The item could not be delivered and was left in credits' Redis, for credits to apply."""


def settlement_item(
    reservation_id: str,
    charged: int,
    *,
    overage: int = 0,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The batch item that commits `charged` (a release when 0), plus `overage` credits beyond the
    hold and the usage `details` of the ledger entry."""
    if charged <= 0:
        return {"reservation_id": reservation_id, "action": "release"}
    item: dict[str, Any] = {"reservation_id": reservation_id, "action": "commit", "amount": charged}
    if overage > 0:
        item["overage"] = overage
    if details is not None:
        item["details"] = details
    return item


@dataclass(slots=True)
class _Item:
    reservation_id: str
    payload: dict[str, Any]
    future: asyncio.Future[dict[str, Any]]
    user_id: str = ""
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
        parker: Parker | None = None,
    ) -> None:
        self.credits = credits
        self.parker = parker
        # Since when sending to credits fails (None: the last send got through).
        self.failing_since: float | None = None
        self._parking: set[asyncio.Task[None]] = set()
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
        self._retrying: dict[int, tuple[asyncio.TimerHandle, list[_Item]]] = {}
        self._closing = False
        self._closed = False

    @property
    def in_trouble(self) -> bool:
        """Credits could not be reached by the last send (nothing got through since)."""
        return self.failing_since is not None

    def reached(self) -> None:
        """Credits answered (here or on another call): holds may go to Redis again."""
        self.failing_since = None

    def submit(
        self,
        reservation_id: str,
        charged: int,
        *,
        user_id: str = "",
        urgent: bool = False,
        overage: int = 0,
        details: dict[str, Any] | None = None,
    ) -> asyncio.Future[dict[str, Any]]:
        """Queues a commit of `charged` (a release when 0), plus `overage` credits beyond the hold and
        the usage `details` of the ledger entry; the future gets credits' answer for it (the body the
        single endpoint returns), or the error it refused with. Urgent: someone waits for the answer,
        so the batch leaves without lingering. With `user_id` it can be parked."""
        item = settlement_item(reservation_id, charged, overage=overage, details=details)
        future = self._queue(reservation_id, item, user_id)
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
        return self._queue(placed.reservation_id, placed.record(), placed.user_id)

    def _queue(
        self, reservation_id: str, payload: dict[str, Any], user_id: str = ""
    ) -> asyncio.Future[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        if self._runner is None and not self._closing:  # while closing, aclose sends the queue
            self._runner = loop.create_task(self._run(), name="proxy-settlements")
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        item = _Item(reservation_id, payload, future, user_id)
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
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self._park_or_retry(batch)
                return
            except asyncio.CancelledError:
                # Only aclose cancels a send, once its time is up: these were not (known to be)
                # applied, and aclose parks them (applying one twice changes nothing).
                self._pending.extend(batch)
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
            self.failing_since = None
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

    def _park_or_retry(self, items: list[_Item]) -> None:
        """Parks in Redis what failed to reach credits; what cannot be parked is retried from here."""
        parkable = [item for item in items if item.user_id] if self.parker is not None else []
        rest = [item for item in items if not item.user_id] if parkable else items
        if rest:
            self._retry_or_fail(rest)
        if parkable:
            task = asyncio.get_running_loop().create_task(self._park(parkable))
            self._parking.add(task)
            task.add_done_callback(self._parking.discard)

    async def _park(self, items: list[_Item], *, retry: bool = True) -> None:
        assert self.parker is not None
        by_user: dict[str, list[_Item]] = {}
        for item in items:
            by_user.setdefault(item.user_id, []).append(item)
        for user_id, own in by_user.items():
            entries = [(i.reservation_id, None if i.payload["action"] == "hold" else i.payload) for i in own]
            try:
                await self.parker(user_id, entries)
            except Exception:
                log.warning("parking %d settlements in Redis failed", len(own), exc_info=True)
                if retry:
                    self._retry_or_fail(own)
                else:
                    for item in own:
                        _fail(item, ServiceUnavailable("The proxy is shutting down."))
                continue
            for item in own:
                _fail(item, SettlementParked(item.reservation_id))

    def _retry_or_fail(self, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        # Items that failed together come back together, on one timer: a timer each let a busy
        # event loop run the batcher between them and split the retry into several calls.
        by_delay: dict[float, list[_Item]] = {}
        given_up: list[_Item] = []
        for item in items:
            item.attempts += 1
            if item.attempts >= self.max_attempts or self._closing:
                given_up.append(item)
                continue
            delay = min(self.retry_base * 2 ** (item.attempts - 1), self.max_delay)
            by_delay.setdefault(delay, []).append(item)
        # What is given up on here (out of attempts, or the proxy stopping) is left in credits' Redis
        # when it can be: a served request's settlement must outlive this process.
        parkable = [item for item in given_up if item.user_id] if self.parker is not None else []
        for item in given_up:
            if not item.user_id or self.parker is None:
                _fail(item, ServiceUnavailable("The credits service is unavailable."))
        if parkable:
            task = loop.create_task(self._park(parkable, retry=False))
            self._parking.add(task)
            task.add_done_callback(self._parking.discard)
        for delay, group in by_delay.items():
            key = id(group)
            self._retrying[key] = (loop.call_later(delay, self._requeue, key, group), group)

    def _requeue(self, key: int, items: list[_Item]) -> None:
        self._retrying.pop(key, None)
        self._pending.extend(items)
        self._wake.set()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Sends what is queued (within `timeout`, less the time left to park the rest), then stops;
        what could not be sent, and what waits to be retried after a failure, is parked in Redis
        (with a parker), or fails (its hold expires at credits)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        # Parking is one Redis call per user: keep a share of the time for it.
        send_for = timeout / 2 if self.parker is not None else timeout
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0 if self.in_trouble and self.parker is not None else send_for):
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
        for handle, items in self._retrying.values():
            handle.cancel()
            self._pending.extend(items)
        self._retrying.clear()
        self._closed = True
        left, self._pending = self._pending, []
        parkable = [item for item in left if item.user_id] if self.parker is not None else []
        if parkable or self._parking:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(end - loop.time(), 0.5)):
                    if self._parking:
                        await asyncio.wait(set(self._parking))
                    await self._park(parkable, retry=False)
            for task in list(self._parking):
                task.cancel()
        for item in left:
            _fail(item, ServiceUnavailable("The proxy is shutting down."))


def _fail(item: _Item, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)
        # Nobody may be waiting (a background settlement that gave up): mark it retrieved.
        item.future.exception()


__all__ = ["SettlementBatcher", "SettlementParked", "settlement_item"]
