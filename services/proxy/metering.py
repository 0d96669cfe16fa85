"""Charging for a request: hold its price before the upstream call, then commit what was used or
release the hold.

The hold is the only step on the request path. Unless `HOLDS_IN_REDIS` is off, the hold is placed
in the credits service's Redis (`REDIS_URL`) directly with the reserve.lua credits runs (one round
trip, no HTTP call, no PostgreSQL write on the path) and recorded at credits in the background, in
the same batches as the settlements; anything but the plain case (account not loaded, too few
credits, an idempotency key, Redis unreachable) goes to credits' HTTP reserve, which decides it.
A hold is settled only after credits has recorded it.

Commit and release of served requests run as tracked background tasks after the response is written
(a crash leaves the hold to expire back to the user: at credits, or in Redis if it was never
recorded). Releases after a failure are awaited, shielded from cancellation, so the error response
can report the balance; they never let an exception escape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from shared.errors import AppError, InsufficientCredits, ServiceUnavailable
from shared.holds.fast_path import PlacedHold, RedisHolds

from .downstream import CreditsClient, DownstreamError, Reservation
from .metrics import (
    CREDITS_CHARGED,
    HOLDS_EXTENDED,
    HOLDS_LOST,
    HOLDS_PLACED_IN_REDIS,
    HOLDS_PLACED_OVER_HTTP,
    REQUESTS_REFUSED,
    SETTLEMENT_FAILURES,
)
from .quote import Charge, Quote
from .settlements import SettlementBatcher, SettlementParked, settlement_item

log = logging.getLogger("proxy.metering")


@dataclass(slots=True)
class Hold:
    user_id: str
    # The request's price; a hold placed for less than its first quote carries the fitted one.
    quote: Quote
    reservation: Reservation
    settled: bool = False
    # For a hold placed in Redis: credits' answer to recording it, which the settlement waits for.
    recorded: asyncio.Future[dict[str, Any]] | None = None
    # When (monotonic) the hold's deadline is next moved on while its request is still served.
    renew_at: float = 0.0

    @property
    def amount(self) -> int:
        return self.reservation.amount

    @property
    def operation(self) -> str:
        return self.quote.operation

    def remaining_after(self, charged: int) -> int:
        """The user's available credits once this hold settles at `charged` (ignoring other traffic)."""
        return max(self.reservation.credits_remaining + self.amount - charged, 0)


def credit_headers(charged: int, remaining: int | None, threshold: int) -> dict[str, str]:
    headers = {"x-credits-charged": str(charged)}
    if remaining is not None:
        headers["x-credits-remaining"] = str(remaining)
        if remaining <= threshold:
            headers["x-credits-low"] = "true"
    return headers


class Meter:
    def __init__(
        self,
        credits: CreditsClient,
        low_balance_threshold: int,
        redis_holds: RedisHolds | None = None,
        *,
        settle_linger_seconds: float = 0.0,
        hold_ttl_seconds: float = 600.0,
    ) -> None:
        self.credits = credits
        self.redis_holds = redis_holds
        self.settlements = SettlementBatcher(
            credits,
            linger_seconds=settle_linger_seconds,
            parker=redis_holds.park if redis_holds is not None else None,
        )
        self.threshold = low_balance_threshold
        self._tasks: set[asyncio.Task[Any]] = set()
        # Each user's settlements still on their way, and the users a request is waiting for
        # (their settlements skip the linger): see `_after_settlements`.
        self._settling: dict[str, set[asyncio.Task[Any]]] = {}
        self._hurried: dict[str, int] = {}
        # The longest a request waits for its user's earlier settlements before it asks credits.
        self.settle_wait_seconds = 2.0
        # Holds whose requests are still being served, by reservation id: a request that outlives
        # half its hold's lifetime (a long stream) has the deadline moved on (see `_renew`).
        self.hold_ttl_seconds = hold_ttl_seconds
        self._serving: dict[str, Hold] = {}
        self._renewer: asyncio.Task[None] | None = None

    async def hold(
        self,
        user_id: str,
        quote: Quote,
        *,
        idempotency_key: str | None = None,
        create_missing_user: bool = False,
    ) -> Hold:
        """Holds the request's largest cost. A token-priced chat whose largest cost the balance cannot
        cover is held for what the balance allows, its output cap lowered to fit (`hold.quote`).
        Raises InsufficientCredits (402) when not even the input is covered, ServiceUnavailable when
        credits cannot be reached."""
        amount = quote.largest
        # Not while credits cannot be reached: a hold goes to Redis only if its record can reach
        # credits within bounded time (the HTTP reserve below then fails: 503).
        if self.redis_holds is not None and idempotency_key is None and not self.settlements.in_trouble:
            placed = await self.redis_holds.place(user_id, amount)
            if placed is None and user_id in self._settling:
                placed = await self._after_settlements(user_id, amount)
            if placed is not None:
                HOLDS_PLACED_IN_REDIS.inc()
                reservation = Reservation(placed.reservation_id, placed.amount, placed.available)
                hold = Hold(user_id, quote, reservation)
                hold.recorded = self.settlements.record(placed)
                return self._serve(hold)
        HOLDS_PLACED_OVER_HTTP.inc()
        try:
            try:
                reservation = await self.credits.reserve(user_id, amount, idempotency_key)
                chosen = quote
            except DownstreamError as exc:
                if exc.status_code == 404 and create_missing_user:
                    await self.credits.ensure_user(user_id)
                    reservation = await self.credits.reserve(user_id, amount, idempotency_key)
                    chosen = quote
                elif exc.status_code == 402 and quote.price.per_token:
                    # Hold what the balance allows and shorten the output to fit it.
                    available = int((await self.credits.account(user_id))["credits_remaining"])
                    fitted = quote.fitted(available) if available > 0 else None
                    if fitted is None:
                        raise InsufficientCredits() from None
                    reservation = await self.credits.reserve(user_id, fitted.largest, idempotency_key)
                    chosen = fitted
                else:
                    raise
            self.settlements.reached()
        except DownstreamError as exc:
            if exc.status_code == 402:
                REQUESTS_REFUSED.labels("insufficient_credits").inc()
                raise InsufficientCredits() from None
            raise
        return self._serve(Hold(user_id, chosen, reservation))

    # --- keeping a hold alive while its request is served ---

    def _serve(self, hold: Hold) -> Hold:
        hold.renew_at = time.monotonic() + self.hold_ttl_seconds / 2
        self._serving[hold.reservation.reservation_id] = hold
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew(), name="proxy-hold-renewer")
        return hold

    async def _renew(self) -> None:
        """Moves on the deadline of every hold whose request has run for half the hold's lifetime, so
        a hold never lapses while the proxy still serves its request (docs/api.md, Proxy: the TTL only ends
        holds whose proxy went away). Runs while holds are being served; one pass per quarter TTL."""
        period = self.hold_ttl_seconds / 4
        try:
            while self._serving:
                await asyncio.sleep(period)
                now = time.monotonic()
                for rid, hold in list(self._serving.items()):
                    if hold.settled:
                        del self._serving[rid]  # settled outside `_settle` (the worker's commit)
                    elif hold.renew_at <= now:
                        hold.renew_at = now + self.hold_ttl_seconds / 2
                        # Tracked for `drain` only: a user's settlements are what a refused hold waits for.
                        task = asyncio.get_running_loop().create_task(self._extend(hold))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
        finally:
            self._renewer = None

    async def _extend(self, hold: Hold) -> None:
        rid = hold.reservation.reservation_id
        if hold.recorded is not None:
            try:
                if not await self._was_recorded(hold, "extend"):
                    return
            except SettlementParked:
                # The record waits in credits' Redis until credits applies it; until then credits
                # refuses the extension, so it is tried again on the next pass (below).
                pass
        deadline_ms = int(time.time() * 1000 + self.hold_ttl_seconds * 1000)
        try:
            await self.settlements.extend(rid, deadline_ms)
            HOLDS_EXTENDED.inc()
            return
        except AppError as exc:
            if not hold.settled:
                log.warning("extending hold %s refused: %s %s", rid, exc.status_code, exc.message)
        except Exception:
            log.exception("extending hold %s failed", rid)
        # Not extended: try again on the renewer's next pass, well before the deadline.
        hold.renew_at = time.monotonic()

    async def _after_settlements(self, user_id: str, amount: int) -> PlacedHold | None:
        """Places the hold again once the user's earlier settlements have reached credits.

        Until then an earlier request's hold still covers its whole price (settlements linger to share
        a batch), so a user who sends requests back to back near the end of the balance would be
        refused, or have the output cut, for credits that are about to come back. Only a refused
        placement pays this wait."""
        waiting = self._settling.get(user_id)
        if not waiting or self.redis_holds is None:
            return None
        self._hurried[user_id] = self._hurried.get(user_id, 0) + 1
        try:
            self.settlements.flush()
            await asyncio.wait(set(waiting), timeout=self.settle_wait_seconds)
        finally:
            if self._hurried[user_id] == 1:
                del self._hurried[user_id]
            else:
                self._hurried[user_id] -= 1
        return await self.redis_holds.place(user_id, amount)

    # --- settling ---

    def settle_later(self, hold: Hold, charge: Charge | None) -> None:
        """Commits `charge` (or releases when None or free) in the background, after the response is sent."""
        if hold.settled:
            return
        hold.settled = True
        self._serving.pop(hold.reservation.reservation_id, None)
        self._track(hold.user_id, asyncio.get_running_loop().create_task(self._settle(hold, charge)))

    def _track(self, user_id: str, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        user_tasks = self._settling.setdefault(user_id, set())
        user_tasks.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._tasks.discard(task)
            user_tasks.discard(task)
            if not user_tasks and self._settling.get(user_id) is user_tasks:
                del self._settling[user_id]

        task.add_done_callback(done)

    async def release_now(self, hold: Hold) -> int | None:
        """Releases the hold, shielded from cancellation; returns the balance afterwards if known."""
        if hold.settled:
            return None
        hold.settled = True
        self._serving.pop(hold.reservation.reservation_id, None)
        task = asyncio.get_running_loop().create_task(self._settle(hold, None, urgent=True))
        self._track(hold.user_id, task)
        try:
            result: int | None = await asyncio.shield(task)
            return result
        except asyncio.CancelledError:
            raise
        except Exception:
            return None

    async def _settle(self, hold: Hold, charge: Charge | None, *, urgent: bool = False) -> Any:
        """Sends the settlement with the next batch (retried there while credits is unreachable).
        A charge above the hold commits the hold and asks credits for the rest as `overage` (taken
        from what the balance has, the remainder owed). Urgent: the caller waits for the answer, so
        neither the record nor the settlement lingers."""
        charged = charge.credits if charge is not None else 0
        action = "commit" if charged > 0 else "release"
        rid = hold.reservation.reservation_id
        overage = max(charged - hold.amount, 0)
        details = hold.quote.details(charge) if charge is not None and charged > 0 else None
        item = settlement_item(rid, charged - overage, overage=overage, details=details)
        if urgent and hold.recorded is not None and not hold.recorded.done():
            self.settlements.flush()
        if hold.recorded is not None:
            try:
                if not await self._was_recorded(hold, action):
                    return None
            except SettlementParked:
                # The record waits in Redis for credits: the settlement goes there too, after it.
                await self._park(hold, item)
                return None
        try:
            urgent = urgent or hold.user_id in self._hurried
            result = await self.settlements.submit(
                rid,
                charged - overage,
                user_id=hold.user_id,
                urgent=urgent,
                overage=overage,
                details=details,
            )
        except SettlementParked:
            return None
        except ServiceUnavailable:
            if await self._park(hold, item):
                return None
        except AppError as exc:
            log.error("%s of reservation %s refused: %s %s", action, rid, exc.status_code, exc.message)
        except Exception:
            log.exception("%s of reservation %s failed", action, rid)
        else:
            if charged > 0:
                CREDITS_CHARGED.labels(hold.operation).inc(charged)
            remaining = result.get("credits_remaining")
            return int(remaining) if isinstance(remaining, int) else None
        SETTLEMENT_FAILURES.labels(action).inc()
        log.error("could not %s reservation %s; the hold will expire at credits", action, rid)
        return None

    async def _was_recorded(self, hold: Hold, action: str) -> bool:
        """Waits for credits to record a hold placed in Redis. False if it did not: then there is
        nothing to settle (refused: the hold is gone; unreachable for good: it lapses in Redis)."""
        assert hold.recorded is not None
        rid = hold.reservation.reservation_id
        try:
            await hold.recorded
            return True
        except SettlementParked:
            raise
        except AppError as exc:
            if exc.status_code in (402, 409):
                # Lost with a Redis wipe and no longer covered, or past its deadline: credits released
                # it, so the request goes uncharged rather than overspend the balance.
                HOLDS_LOST.inc()
                log.error("hold %s was refused by credits (%s); not charged", rid, exc.message)
                return False
            log.error("recording hold %s refused: %s %s", rid, exc.status_code, exc.message)
        except Exception:
            log.exception("recording hold %s failed", rid)
        SETTLEMENT_FAILURES.labels(action).inc()
        log.error("could not record hold %s; it lapses in Redis at its deadline", rid)
        return False

    async def _park(self, hold: Hold, item: dict[str, Any]) -> bool:
        """Leaves the settlement in credits' Redis for credits to apply; False if that failed too."""
        if self.redis_holds is None:
            return False
        rid = hold.reservation.reservation_id
        try:
            await self.redis_holds.park(hold.user_id, [(rid, item)])
        except Exception:
            log.exception("could not park the settlement of %s in Redis", rid)
            return False
        return True

    async def balance(self, user_id: str) -> int | None:
        """The user's available credits for an error response's headers, if credits answers."""
        try:
            return int((await self.credits.account(user_id))["credits_remaining"])
        except Exception:
            return None

    async def drain(self, timeout: float) -> None:
        """Settles what is in flight within `timeout`: sent to credits, or (credits unreachable)
        parked in its Redis; what is left after `timeout` is given up."""
        if self._renewer is not None:
            self._renewer.cancel()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        if self._tasks and not self.settlements.in_trouble:
            await asyncio.wait(set(self._tasks), timeout=timeout / 3)
        await self.settlements.aclose(max((end - loop.time()) * 2 / 3, 0.1))
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(end - loop.time(), 0.1))
        for task in list(self._tasks):
            task.cancel()
