"""What proxies left in Redis for credits (see shared/holds/protocol.py): records of holds they placed and
settlements they could not deliver, kept in each user's pending hash until applied here, and the late
charge of a served request whose hold expired before its commit arrived."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import timedelta

from services.credits import metrics
from services.credits.clock import ms
from services.credits.config import CreditsSettings
from services.credits.ids import is_uuid
from services.credits.mirror import Mirror, Sync
from services.credits.reservations import HoldToRecord, Reservations
from services.credits.settlements import Settlements, SettleResult
from services.credits.stores import accounts as account_store
from services.credits.stores import ledger_entries as ledger_store
from services.credits.stores import overages as overage_store
from services.credits.stores import reservations as reservation_store
from shared.errors import AppError, Conflict, ServiceUnavailable
from shared.holds.protocol import PendingHold, pending_entry

log = logging.getLogger("credits.pending")


class PendingSettlements:
    def __init__(
        self, mirror: Mirror, reservations: Reservations, settlements: Settlements, settings: CreditsSettings
    ) -> None:
        self.mirror = mirror
        self.engine, self.holds, self.clock = mirror.engine, mirror.holds, mirror.clock
        self.reservations = reservations
        self.settlements = settlements
        self.settings = settings
        self.threshold = settings.low_balance_threshold
        self._draining: set[str] = set()  # users whose pending records this process is applying

    async def drain_pending(self, user_id: str) -> tuple[int, bool]:
        """Applies what proxies left in the user's pending hash in Redis (see shared/holds/protocol.py):
        records of holds they placed, and settlements they could not deliver (credits unreachable,
        or the proxy stopping). Each is idempotent, so one also delivered over HTTP, or applied by
        another credits process at the same time, counts once. A settlement that waited past its
        hold's deadline is still applied: the hold stayed counted (in Redis, and in PostgreSQL once
        recorded), so its deadline is moved on first. Returns (entries applied or refused for good,
        whether all of them were)."""
        if user_id in self._draining:
            return 0, True
        self._draining.add(user_id)
        try:
            fields = await self.holds.pending(user_id)
            if not fields:
                return 0, True
            keep_until = self.clock() + timedelta(seconds=self.settings.late_settlement_seconds)
            records: list[HoldToRecord] = []
            settles: list[tuple[str, str, str, int | None]] = []  # (field, reservation id, action, amount)
            # per settlement: its usage details (JSON text) and the credits it cost beyond its hold
            settle_details: list[str | None] = []
            settle_overages: list[int] = []
            done: list[str] = []
            for name, value in fields.items():
                try:
                    entry = pending_entry(name, value)
                except ValueError:  # JSONDecodeError included
                    log.error("dropping a malformed pending entry of %s: %s=%r", user_id, name, value)
                    done.append(name)
                    continue
                if isinstance(entry, PendingHold):
                    records.append(
                        HoldToRecord(
                            entry.reservation_id,
                            user_id,
                            entry.amount,
                            entry.epoch,
                            entry.deadline_ms,
                            entry.kind,
                        )
                    )
                else:
                    settles.append((name, entry.reservation_id, entry.action, entry.amount))
                    settle_details.append(entry.details)
                    settle_overages.append(entry.overage)
            settling = {rid for _, rid, _, _ in settles}
            keep_ms = ms(keep_until)
            records = [
                replace(r, deadline_ms=max(r.deadline_ms, keep_ms)) if r.reservation_id in settling else r
                for r in records
            ]
            complete = True
            now_ms = ms(self.clock())
            lapsed: list[str] = []  # recorded past their deadline with no settlement: they end now
            for record, outcome in zip(
                records, await self.reservations.record_holds(records, late=True), strict=True
            ):
                if isinstance(outcome, ServiceUnavailable):
                    complete = False
                    continue
                if isinstance(outcome, AppError):
                    log.error(
                        "pending hold %s of %s refused: %s", record.reservation_id, user_id, outcome.message
                    )
                elif record.deadline_ms <= now_ms:
                    lapsed.append(outcome.id)
                done.append(f"h:{record.reservation_id}")
            if lapsed:
                async with self.engine.begin() as conn:
                    await account_store.lock_accounts_key_share(conn, [user_id])
                    ended = await reservation_store.expire_holds(conn, lapsed, self.clock())
                metrics.CREDITS_EXPIRED.inc(sum(r.amount for r in records if r.reservation_id in ended))
                await self.mirror.sync([Sync(user_id, ended=tuple(ended))])
            if settles:
                ids = [rid for _, rid, _, _ in settles if is_uuid(rid)]
                async with self.engine.begin() as conn:
                    await reservation_store.extend_open_holds(conn, ids, keep_until)
                outcomes = await self.settlements.settle_many(
                    [(rid, action, amount) for _, rid, action, amount in settles],
                    settle_details,
                    settle_overages,
                )
                for (name, rid, action, charge), overage, result in zip(
                    settles, settle_overages, outcomes, strict=True
                ):
                    if isinstance(result, ServiceUnavailable):
                        complete = False
                        continue
                    if isinstance(result, Conflict) and action == "commit" and charge is not None:
                        # Expired before its settlement got here (another credits process swept it
                        # meanwhile): the request was served, so it is charged all the same.
                        result = await self.charge_late(rid, charge, overage)
                    if isinstance(result, AppError):
                        log.error("pending %s of %s refused: %s", action, rid, result.message)
                    else:
                        metrics.PENDING_SETTLEMENTS_APPLIED.inc()
                    done.append(name)
            await self.holds.forget_pending(user_id, done)
            return len(done), complete
        finally:
            self._draining.discard(user_id)

    async def charge_late(self, rid: str, amount: int, overage: int = 0) -> SettleResult | AppError:
        """Charges a served request whose hold expired before its commit arrived: `amount` (at most
        the hold) plus the `overage` its usage cost beyond the hold. What the user's available credits
        cover comes off the balance, the rest is recorded as owed (paid first out of the next
        purchase). The commit's ledger reference keeps it to once."""
        now = self.clock()
        async with self.engine.begin() as conn:
            found = await reservation_store.get_reservation(conn, rid, for_update=True)
            if found is None or found.status != "expired" or amount > found.amount:
                return Conflict(f"Reservation {rid} can no longer be committed.")
            account = await account_store.get_account(conn, found.user_id, lock="update")
            available = int(account.balance) - await reservation_store.open_holds_total(conn, found.user_id)
            total = amount + max(overage, 0)
            take = min(total, max(available, 0))
            balance, version, _ = await ledger_store.change_balance(
                conn,
                found.user_id,
                -take,
                "usage",
                f"reservation:{rid}:commit",
                threshold=self.threshold,
                used=total,
            )
            if total > take:
                await account_store.add_owed(conn, found.user_id, total - take)
            if overage > 0:  # charged here: a replay of the commit must not charge it again
                taken = max(take - amount, 0)
                await overage_store.record_overage(
                    conn, rid, found.user_id, overage, taken, overage - taken, now
                )
            await reservation_store.end_reservation(conn, rid, "committed", now, charged=amount)
        log.warning("reservation %s charged %d after it expired (%d owed)", rid, total, total - take)
        await self.mirror.sync([Sync(found.user_id, balance, version)])
        return SettleResult(rid, amount, found.amount - amount, 0)

    async def drain_listed(self) -> int:
        """Applies the pending entries of every user a proxy listed (run by the sweeper)."""
        total = 0
        for shard in range(self.holds.pending_shards):
            for user_id, score in await self.holds.pending_users(shard):
                try:
                    applied, complete = await self.drain_pending(user_id)
                except Exception:
                    log.exception("applying the pending settlements of %s failed", user_id)
                    continue
                total += applied
                if complete:
                    await self.holds.unlist_pending(shard, user_id, score)
        return total
