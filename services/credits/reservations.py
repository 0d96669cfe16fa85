"""Placing holds: a reserve (one Redis script, then the hold writer's group commit), the recording of
holds proxies placed straight in Redis, reading a reservation, and moving the deadlines of holds
whose requests are still being served. Ending holds is settlements.py's."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from services.credits import metrics
from services.credits.clock import ms
from services.credits.config import CreditsSettings
from services.credits.ids import is_uuid, uuid_or_none
from services.credits.mirror import Mirror, Sync
from services.credits.stores import accounts as account_store
from services.credits.stores import reservations as reservation_store
from services.credits.stores.reservations import NewHold, Reservation
from services.credits.writer import HoldWriter, Persisted
from shared.errors import (
    AppError,
    Conflict,
    InsufficientCredits,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from shared.holds.protocol import ReserveOutcome

log = logging.getLogger("credits.reservations")

_HOLD_LOST = "The hold is no longer in Redis and the balance no longer covers it."


@dataclass(frozen=True)
class ReserveResult:
    reservation: Reservation
    available: int


@dataclass(frozen=True)
class HoldToRecord:
    """A hold another process placed in Redis with reserve.lua (the proxy's fast path), to record."""

    reservation_id: str
    user_id: str
    amount: int
    epoch: str
    deadline_ms: int
    kind: str = "usage"


@dataclass(frozen=True)
class Extended:
    """A hold whose deadline moved (or stayed, when it was already later)."""

    reservation_id: str
    expires_at: datetime


class Reservations:
    def __init__(self, mirror: Mirror, pool: asyncpg.Pool, settings: CreditsSettings) -> None:
        self.mirror = mirror
        self.engine, self.holds, self.clock = mirror.engine, mirror.holds, mirror.clock
        self.pool = pool
        self.settings = settings
        self.writer = HoldWriter(pool, mirror.holds, settings.hold_batch_max)

    async def start(self) -> None:
        self.writer.start()

    async def close(self) -> None:
        await self.writer.close()

    async def reserve(
        self,
        user_id: str,
        amount: int,
        idempotency_key: str | None,
        ttl_seconds: int | None = None,
        *,
        up_to: bool = False,
        kind: str = "usage",
        count_metrics: bool = True,
    ) -> ReserveResult | None:
        ttl = ttl_seconds or self.settings.reservation_ttl_seconds
        rid = str(uuid.uuid4())
        now = self.clock()
        expires_at = now + timedelta(seconds=ttl)
        deadline_ms = int(expires_at.timestamp() * 1000)

        async def place() -> ReserveOutcome:
            for _ in range(5):
                outcome = await self.holds.reserve(
                    user_id, rid, amount, idempotency_key, deadline_ms, ms(now), up_to=up_to
                )
                if outcome.status != -1:
                    return outcome
                await self.mirror.rebuild(user_id)  # raises NotFound for an unknown user
            raise ServiceUnavailable("Could not load the balance; try again.")

        outcome = await place()
        if outcome.status == 0 and await self.mirror.catch_up(user_id, at_most_every=1.0):
            outcome = await place()
        if outcome.status == 0:
            if idempotency_key is not None:
                # Redis forgets a key when its hold ends; PostgreSQL remembers it. A retry of a reserve
                # whose reservation was since committed gets that reservation, not a 402.
                async with self.engine.connect() as conn:
                    found = await reservation_store.get_reservation_by_key(conn, user_id, idempotency_key)
                if found is not None:
                    if count_metrics:
                        metrics.RESERVATIONS_REPLAYED.inc()
                    return ReserveResult(found, outcome.available)
            if count_metrics:
                metrics.RESERVATIONS_INSUFFICIENT.inc()
            raise InsufficientCredits()
        if outcome.status == 2:
            assert outcome.existing_id is not None
            existing = await self._await_reservation(outcome.existing_id)
            available, _ = await self.mirror.live(user_id)
            if count_metrics:
                metrics.RESERVATIONS_REPLAYED.inc()
            return ReserveResult(existing, available)
        if outcome.held == 0:
            return None  # up_to with nothing available
        hold = NewHold(rid, user_id, outcome.held, idempotency_key, kind, expires_at)
        try:
            persisted = await self.writer.persist(hold, outcome.epoch)
        except Exception as exc:
            await self._undo_hold(user_id, rid)
            raise ServiceUnavailable("Could not record the reservation; try again.") from exc
        if persisted is Persisted.DUPLICATE:
            await self._undo_hold(user_id, rid)
            assert idempotency_key is not None
            async with self.engine.connect() as conn:
                found = await reservation_store.get_reservation_by_key(conn, user_id, idempotency_key)
            if found is None:
                raise ServiceUnavailable("Could not record the reservation; try again.")
            available, _ = await self.mirror.live(user_id)
            return ReserveResult(found, available)
        if persisted is Persisted.LOST:
            await self._release_lost(user_id, rid)
            if count_metrics:
                metrics.RESERVATIONS_INSUFFICIENT.inc()
            raise InsufficientCredits()
        if count_metrics:
            metrics.RESERVATIONS_HELD.inc()
            metrics.CREDITS_RESERVED.inc(outcome.held)
        reservation = Reservation(
            rid, user_id, outcome.held, idempotency_key, kind, "held", None, expires_at, now
        )
        return ReserveResult(reservation, outcome.available)

    async def record_holds(
        self, placed: Sequence[HoldToRecord], *, late: bool = False
    ) -> list[Reservation | AppError]:
        """Records holds placed straight in Redis (by the proxy, with this service's reserve.lua), each
        idempotent by reservation id, through the same group commit as `reserve`. Until recorded such
        a hold lives only in Redis, where it lapses after its deadline if it never gets here.

        A hold that is no longer in Redis is refused and recorded as released, so it can never be
        committed: past its deadline (409), never placed, or lost with a Redis wipe when the rebuilt
        balance no longer covers it (402). Returns, per hold, its reservation or the refusal.
        `late`: records taken from the user's pending hash (`PendingSettlements.drain_pending`), where a hold that was
        still in Redis all along may be past its deadline: it is recorded all the same (and then
        expires, unless its settlement is applied with it)."""
        if not placed:
            return []
        now = self.clock()
        now_ms = ms(now)
        longest_ms = now_ms + self.settings.max_reservation_ttl_seconds * 1000
        known = await account_store.known_users(self.pool, sorted({p.user_id for p in placed}))

        async def record(p: HoldToRecord) -> Reservation | AppError:
            rid = uuid_or_none(p.reservation_id)
            if rid is None:
                return InvalidRequest("reservation_id must be a UUID.")
            if p.user_id not in known:
                return NotFound(f"Unknown user {p.user_id!r}.")
            if p.deadline_ms <= now_ms and not late:
                return Conflict(f"Reservation {rid} expired before it was recorded.")
            if p.deadline_ms > longest_ms:
                return InvalidRequest("deadline_ms lies beyond the longest reservation TTL.")
            expires_at = datetime.fromtimestamp(p.deadline_ms / 1000, UTC)
            hold = NewHold(rid, p.user_id, p.amount, None, p.kind, expires_at)
            try:
                persisted = await self.writer.persist(hold, p.epoch, adopted=True)
            except Exception:
                log.exception("recording hold %s failed", rid)
                return ServiceUnavailable("Could not record the reservation; try again.")
            if persisted is Persisted.OK:
                metrics.RESERVATIONS_HELD.inc()
                metrics.CREDITS_RESERVED.inc(p.amount)
                return Reservation(rid, p.user_id, p.amount, None, p.kind, "held", None, expires_at, now)
            if persisted is Persisted.LOST:
                await self._release_lost(p.user_id, rid)
                metrics.RESERVATIONS_INSUFFICIENT.inc()
                return InsufficientCredits(_HOLD_LOST)
            # Recorded before: a retried batch whose answer was lost. Answer as the first time.
            async with self.engine.connect() as conn:
                found = await reservation_store.get_reservation(conn, rid)
            if found is None or found.user_id != p.user_id or found.amount != p.amount:
                return Conflict(f"Reservation {rid} is already recorded with other terms.")
            if found.status == "released" and found.charged is None:
                return InsufficientCredits(_HOLD_LOST)
            if found.status == "expired":
                return Conflict(f"Reservation {rid} expired before it was recorded.")
            return found

        return list(await asyncio.gather(*(record(p) for p in placed)))

    async def extend_holds(self, items: Sequence[tuple[str, int]]) -> list[Extended | AppError]:
        """Moves the deadlines of open holds whose requests are still being served (a long stream) to
        the given times, at most the longest reservation TTL from now and never earlier than they
        were: PostgreSQL first (the sweeper and commits judge by it), then Redis. A hold that has
        ended or is past its deadline is not revived (409). Returns, per item, the reservation's id
        and new `expires_at`, or the refusal."""
        now = self.clock()
        longest_ms = ms(now) + self.settings.max_reservation_ttl_seconds * 1000
        canonical = [uuid_or_none(rid) for rid, _ in items]
        wanted: dict[str, datetime] = {}
        for rid, (_, deadline_ms) in zip(canonical, items, strict=True):
            if rid is not None:
                wanted[rid] = datetime.fromtimestamp(min(deadline_ms, longest_ms) / 1000, UTC)
        extended: dict[str, tuple[str, datetime]] = {}
        if wanted:
            async with self.engine.begin() as conn:
                rows = await reservation_store.extend_holds(conn, list(wanted), list(wanted.values()), now)
            extended = {str(r.id): (str(r.user_id), r.expires_at) for r in rows}
            try:
                await self.holds.extend_deadlines(
                    [(user, rid, ms(expires)) for rid, (user, expires) in extended.items()]
                )
            except Exception:
                # PostgreSQL has the new deadline: past the old one, the scripts drop the account and
                # the rebuild loads the hold with the new one.
                log.exception("moving %d hold deadlines in Redis failed", len(extended))
        out: list[Extended | AppError] = []
        for (rid, _), checked in zip(items, canonical, strict=True):
            found = extended.get(checked) if checked is not None else None
            if checked is None or found is None:
                out.append(Conflict(f"Reservation {rid} is not held (ended, expired or unknown)."))
            else:
                out.append(Extended(checked, found[1]))
        return out

    async def _release_lost(self, user_id: str, rid: str) -> None:
        """Ends a recorded hold that Redis lost (and could not take back) as released, so it can never
        be committed."""
        async with self.engine.begin() as conn:
            await account_store.lock_accounts_key_share(conn, [user_id])
            await reservation_store.end_reservation(conn, rid, "released", self.clock())
        await self.mirror.sync([Sync(user_id, ended=(rid,))])

    async def _undo_hold(self, user_id: str, rid: str) -> None:
        try:
            await self.holds.apply(user_id, ended=(rid,))
        except Exception:
            log.exception("could not drop hold %s from Redis; the sweeper will", rid)

    async def _await_reservation(self, rid: str) -> Reservation:
        """The reservation behind an idempotent replay; its first request may still be persisting it."""
        for _ in range(60):
            async with self.engine.connect() as conn:
                found = await reservation_store.get_reservation(conn, rid)
            if found is not None:
                return found
            await asyncio.sleep(0.05)
        raise ServiceUnavailable("The reservation with this idempotency key is still being recorded; retry.")

    async def get_reservation(self, rid: str) -> Reservation:
        if not is_uuid(rid):
            raise NotFound("Unknown reservation.")
        async with self.engine.connect() as conn:
            found = await reservation_store.get_reservation(conn, rid)
        if found is None:
            raise NotFound("Unknown reservation.")
        return found
