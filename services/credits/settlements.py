"""Ending holds: commits and releases (each idempotent, alone or in batches), and the overage a
request cost beyond its hold. PostgreSQL decides each outcome (the commit writer's group commit, or
one server-side call); the Redis mirror follows in one pipelined round trip per call."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg
import orjson

from services.credits import metrics
from services.credits.accounts import write_low_balance_event
from services.credits.config import CreditsSettings
from services.credits.ids import uuid_or_none
from services.credits.mirror import Mirror, Sync
from services.credits.reservations import Reservations
from services.credits.stores import accounts as account_store
from services.credits.stores import ledger_entries as ledger_store
from services.credits.stores import overages as overage_store
from services.credits.stores import reservations as reservation_store
from services.credits.stores.reservations import Outcome, Settled
from services.credits.writer import CommitWriter
from shared.errors import AppError, Conflict, InvalidRequest, NotFound
from shared.events import BalanceLow

log = logging.getLogger("credits.settlements")


@dataclass(frozen=True)
class SettleResult:
    """What a commit or release did: credits charged and handed back, and what is available after."""

    reservation_id: str
    charged: int
    refunded: int
    available: int
    # Credits charged beyond the hold (a commit's `overage`), of which `owed` the balance lacked.
    overage: int = 0
    owed: int = 0


class Settlements:
    def __init__(
        self,
        mirror: Mirror,
        pool: asyncpg.Pool,
        reservations: Reservations,
        settings: CreditsSettings,
        *,
        on_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self.mirror = mirror
        self.engine, self.holds, self.clock = mirror.engine, mirror.holds, mirror.clock
        self.pool = pool
        self.reservations = reservations
        self.threshold = settings.low_balance_threshold
        self._on_outbox = on_outbox
        self.commits = CommitWriter(pool, settings.low_balance_threshold, settings.hold_batch_max)
        # A commit that crosses the low-balance threshold writes this event (with its user_id and
        # credits_remaining filled in) to the outbox in the same transaction; built from the model once.
        self._low_event_template = BalanceLow(
            user_id="-", credits_remaining=0, threshold=self.threshold
        ).body()

    async def start(self) -> None:
        self.commits.start()

    async def close(self) -> None:
        await self.commits.close()

    def _low_event(self, now: datetime) -> str:
        return orjson.dumps(
            {**self._low_event_template, "event_id": str(uuid.uuid4()), "occurred_at": now.isoformat()}
        ).decode()

    async def commit(
        self, rid: str, amount: int | None, details: str | None = None, overage: int = 0
    ) -> SettleResult:
        """`details`: the usage entry's details as JSON text (see api_bodies.UsageDetails), or None;
        `overage`: credits the request cost beyond its hold (see `settle_many`)."""
        result = (await self.settle_many([(rid, "commit", amount)], [details], [overage]))[0]
        if isinstance(result, AppError):
            raise result
        return result

    async def release(self, rid: str) -> SettleResult:
        result = (await self.settle_many([(rid, "release", None)]))[0]
        if isinstance(result, AppError):
            raise result
        return result

    async def settle_many(
        self,
        items: Sequence[tuple[str, str, int | None]],
        details: Sequence[str | None] | None = None,
        overages: Sequence[int] | None = None,
    ) -> list[SettleResult | AppError]:
        """Commits ("commit", amount or None for all) and releases ("release") of distinct
        reservations, each idempotent as the single endpoints are. The PostgreSQL side of concurrent
        commits shares the commit writer's transactions; the Redis mirror is updated for the whole
        call in one pipelined round trip. `details` (per item, JSON text or None) goes onto a commit's
        usage entry. `overages` (per item, for commits): credits the request cost beyond its hold,
        charged once with the commit that ends the hold (see `_charge_overage`). Returns, per item,
        its result or the error it is refused with.
        """
        now = self.clock()
        item_details = list(details) if details is not None else [None] * len(items)

        async def settle(
            rid: str | None, action: str, amount: int | None, about: str | None
        ) -> Settled | None:
            if rid is None:
                return None  # not a UUID: no such reservation
            if action == "commit":
                return await self.commits.commit(rid, amount, now, self._low_event(now), about)
            return await reservation_store.release_fast(self.pool, rid, now)

        canonical = [uuid_or_none(rid) for rid, _, _ in items]
        rows = await asyncio.gather(
            *(
                settle(rid, action, amount, about)
                for rid, (_, action, amount), about in zip(canonical, items, item_details, strict=True)
            )
        )
        results: list[SettleResult | AppError | None] = [None] * len(items)
        # (item index, whether its result reports the mirror's answer, user, balance, version)
        syncs: list[tuple[int, bool, str, int | None, int | None]] = []
        for i, (rid, (_, action, amount), row) in enumerate(zip(canonical, items, rows, strict=True)):
            outcome = Outcome.NOT_FOUND if row is None else row.outcome
            if outcome is Outcome.NOT_FOUND:
                results[i] = NotFound("Unknown reservation.")
                continue
            assert rid is not None and row is not None
            user_id, reserved = row.user_id, row.amount
            if action == "commit":
                if outcome is Outcome.TOO_MUCH:
                    results[i] = InvalidRequest(f"amount {amount} exceeds the {reserved} credits reserved.")
                elif outcome is Outcome.RELEASED or outcome is Outcome.EXPIRED:
                    results[i] = Conflict(f"Reservation {rid} was {outcome}; it can no longer be committed.")
                elif outcome is Outcome.EXPIRED_NOW:
                    metrics.CREDITS_EXPIRED.inc(reserved)
                    results[i] = Conflict(f"Reservation {rid} expired; it can no longer be committed.")
                    syncs.append((i, False, user_id, None, None))
                else:  # committed now, or a replay of a commit
                    charged = row.charged
                    results[i] = SettleResult(rid, charged, reserved - charged, 0)
                    if outcome is Outcome.COMMITTED:
                        metrics.CREDITS_COMMITTED.inc(charged)
                        metrics.CREDITS_RELEASED.inc(reserved - charged)
                        if row.crossed:
                            metrics.BALANCE_LOW_EVENTS.inc()
                            self._on_outbox()
                        syncs.append((i, True, user_id, row.balance, row.version))
            else:
                if outcome is Outcome.COMMITTED:
                    results[i] = Conflict(f"Reservation {rid} was committed; it can no longer be released.")
                    continue
                results[i] = SettleResult(rid, 0, reserved, 0)
                if outcome is Outcome.RELEASED_NOW:
                    metrics.CREDITS_RELEASED.inc(reserved)
                    syncs.append((i, True, user_id, None, None))
        available: dict[int, int | None] = {}
        if syncs:
            changes = [
                (user, balance, version, (str(canonical[i]),)) for i, _, user, balance, version in syncs
            ]
            try:
                mirrored = await self.holds.apply_many(changes)
                available = {i: a for (i, report, *_), a in zip(syncs, mirrored, strict=True) if report}
            except Exception:
                # PostgreSQL has the change; the sweeper rebuilds these users' Redis state.
                self.mirror.sync_failed(user for _, _, user, _, _ in syncs)
                log.exception("syncing Redis after %d settlements failed", len(syncs))
        if overages is not None:
            for i, row in enumerate(rows):
                extra = overages[i]
                result = results[i]
                if extra <= 0 or not isinstance(result, SettleResult):
                    continue
                assert row is not None  # a result: the reservation was found
                if row.outcome is not Outcome.COMMITTED:
                    # A replay: its first delivery charged the overage, unless its process died
                    # before it could; then this delivery charges it (and answers as the first).
                    if await overage_store.overage_charged(self.pool, result.reservation_id):
                        continue
                    log.warning("charging the overage of %s on a replay of its commit", result.reservation_id)
                owed = await self._charge_overage(row.user_id, result.reservation_id, extra)
                available.pop(i, None)
                results[i] = replace(result, overage=extra, owed=owed)
        out: list[SettleResult | AppError] = []
        for i, result in enumerate(results):
            assert result is not None
            if isinstance(result, SettleResult):
                remaining = available.get(i)
                if remaining is None:
                    settled = rows[i]
                    assert settled is not None  # a result: the reservation was found
                    remaining, _ = await self.mirror.live(settled.user_id)
                result = SettleResult(
                    result.reservation_id,
                    result.charged,
                    result.refunded,
                    remaining,
                    result.overage,
                    result.owed,
                )
            out.append(result)
        return out

    async def _charge_overage(self, user_id: str, rid: str, extra: int) -> int:
        """Charges `extra` credits a request cost beyond its committed hold (its usage came out above
        the estimate): what is available is taken through a hold of its own, so no concurrent
        reserve can be overdrawn, and the rest is recorded as owed (paid first by the next purchase,
        as a refund's claw-back is). Runs after the commit that ended the hold, and again on a
        replay of that commit when nothing was charged (its process died in between); the hold's
        row in `overage_charges`, written in the transaction that charges, keeps it to once.
        Returns the owed part."""
        reference = f"reservation:{rid}:overage"
        try:
            held = await self.reservations.reserve(
                user_id, extra, None, ttl_seconds=300, up_to=True, kind="overage", count_metrics=False
            )
        except AppError:
            log.exception("holding the overage of %s failed; all of it is recorded as owed", rid)
            held = None
        take = held.reservation.amount if held is not None else 0
        now = self.clock()
        balance = version = None
        async with self.engine.begin() as conn:
            await account_store.get_account(conn, user_id, lock="update")
            if not await overage_store.record_overage(conn, rid, user_id, extra, take, extra - take, now):
                take = extra = 0  # charged already
                if held is not None:
                    await reservation_store.end_reservation(conn, held.reservation.id, "released", now)
            elif take:
                balance, version, crossed = await ledger_store.change_balance(
                    conn, user_id, -take, "usage", reference, threshold=self.threshold, used=take
                )
                assert held is not None
                await reservation_store.end_reservation(
                    conn, held.reservation.id, "committed", now, charged=take
                )
                if crossed:
                    await write_low_balance_event(conn, user_id, balance, self.threshold)
            owed = extra - take
            if owed:
                await account_store.add_owed(conn, user_id, owed)
        metrics.CREDITS_COMMITTED.inc(take)
        self._on_outbox()
        ended = (held.reservation.id,) if held is not None else ()
        await self.mirror.sync([Sync(user_id, balance, version, ended=ended)])
        return owed
