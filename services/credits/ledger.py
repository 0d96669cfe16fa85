"""The credits domain: accounts, grants, purchases, refunds, and two-phase holds.

PostgreSQL is the truth (an append-only ledger; `accounts.balance` caches its sum in the same
transaction). Redis (see holds.py) mirrors balance and open holds so that a reserve is one atomic script.
Every change here is: PostgreSQL transaction first, then the Redis mirror is brought in line by
version (balances) and membership (holds), which makes late, repeated or reordered syncs harmless.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.credits import analytics, metrics, store
from services.credits.config import CreditsSettings
from services.credits.holds import Holds
from services.credits.store import NewHold, Reservation
from services.credits.writer import CommitWriter, HoldWriter, Persisted
from shared.errors import (
    AppError,
    Conflict,
    InsufficientCredits,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from shared.events import ApiAccessUnlocked, BalanceLow, PackPurchased, PackRefunded, PurchaseApplied
from shared.holds.protocol import ReserveOutcome, Snapshot

log = logging.getLogger("credits.ledger")

Clock = Callable[[], datetime]

_HOLD_LOST = "The hold is no longer in Redis and the balance no longer covers it."

# The subscription migration names business among the tiers that unlock the API but gives it no amount; it sits
# between pro and enterprise, and is migrated like enterprise.
MIGRATION_CREDITS = {
    "free": 10,
    "basic": 40,
    "premium": 100,
    "pro": 250,
    "business": 1000,
    "enterprise": 1000,
}
MIGRATION_UNLOCKS = frozenset({"pro", "business", "enterprise"})
SUPPORT_TIERS = (
    (5000, "Dedicated (12h response)"),
    (1200, "Priority (24h response)"),
    (500, "Email (48h response)"),
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def support_tier(purchased_total: int) -> str:
    for floor, name in SUPPORT_TIERS:
        if purchased_total >= floor:
            return name
    return "Community"


class PurchaseNotYetApplied(Exception):
    """A refund arrived before its purchase; the message is retried (and dead-lettered if it never comes)."""


@dataclass(frozen=True)
class ReserveResult:
    reservation: Reservation
    available: int


@dataclass(frozen=True)
class SettleResult:
    reservation_id: str
    charged: int
    refunded: int
    available: int
    # Credits charged beyond the hold (a commit's `overage`), of which `owed` the balance lacked.
    overage: int = 0
    owed: int = 0


@dataclass(frozen=True)
class HoldToRecord:
    """A hold another process placed in Redis with reserve.lua (the proxy's fast path), to record."""

    reservation_id: str
    user_id: str
    amount: int
    epoch: str
    deadline_ms: int
    kind: str = "usage"


@dataclass
class _Sync:
    """What to tell Redis after a PostgreSQL commit."""

    user_id: str
    balance: int | None = None
    version: int | None = None
    ended: tuple[str, ...] = ()
    created: bool = False


class Ledger:
    def __init__(
        self,
        engine: AsyncEngine,
        pool: asyncpg.Pool,
        holds: Holds,
        settings: CreditsSettings,
        *,
        on_outbox: Callable[[], None] = lambda: None,
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.holds = holds
        self.settings = settings
        self.clock = clock
        self._on_outbox = on_outbox
        self.writer = HoldWriter(pool, holds, settings.hold_batch_max)
        self.commits = CommitWriter(pool, settings.low_balance_threshold, settings.hold_batch_max)
        # A commit that crosses the low-balance threshold writes this event (with its user_id and
        # credits_remaining filled in) to the outbox in the same transaction; built from the model once.
        self._low_event_template = BalanceLow(
            user_id="-", credits_remaining=0, threshold=self.threshold
        ).body()
        self._rebuilds: dict[str, asyncio.Future[None]] = {}
        self._caught_up_at: dict[str, float] = {}  # user -> monotonic time of the last catch_up look
        self._failed_syncs: set[str] = set()  # users whose Redis sync failed, for the sweeper to rebuild
        self._draining: set[str] = set()  # users whose pending records this process is applying

    async def start(self) -> None:
        self.writer.start()
        self.commits.start()

    async def close(self) -> None:
        await self.writer.close()
        await self.commits.close()

    def _low_event(self, now: datetime) -> str:
        return orjson.dumps(
            {**self._low_event_template, "event_id": str(uuid.uuid4()), "occurred_at": now.isoformat()}
        ).decode()

    @property
    def threshold(self) -> int:
        return self.settings.low_balance_threshold

    # ------------------------------------------------------------ Redis mirror

    async def rebuild(self, user_id: str, *, force: bool = False, if_behind: bool = False) -> None:
        """Loads a user's Redis state from PostgreSQL under the account row lock (coalesced per process).
        Without `force`, only a missing mirror is loaded; with `if_behind`, only a mirror missing or
        behind the account version (checked under the lock, so a sync that landed meanwhile spares
        the rebuild)."""
        running = self._rebuilds.get(user_id)
        if running is not None and not (force or if_behind):
            await asyncio.shield(running)
            return
        # Holds a proxy placed in Redis but could not get recorded here are in the user's pending
        # hash: into PostgreSQL with them first, or the rebuild would hand their credits back. (Before
        # this rebuild is registered: applying them may itself need the account loaded.)
        await self.drain_pending(user_id)
        running = self._rebuilds.get(user_id)
        if running is not None and not (force or if_behind):
            await asyncio.shield(running)  # started while the pending records were read
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rebuilds[user_id] = future
        try:
            async with self.engine.begin() as conn:
                row = await store.get_account(conn, user_id, lock="update")
                if row is None:
                    raise NotFound(f"Unknown user {user_id!r}.")
                if if_behind:
                    loaded_version = await self.holds.version(user_id)
                    load = loaded_version is None or loaded_version < int(row.version)
                else:
                    load = force or not await self.holds.is_loaded(user_id)
                if load:
                    epoch = await store.next_redis_epoch(conn, user_id)
                    # A hold past its deadline plus the grace period can no longer be committed; the
                    # sweeper ends it in PostgreSQL. Loaded, the scripts would meet it as dead and
                    # drop the account again, round after round.
                    alive_from = _ms(self.clock()) - self.holds.grace_ms
                    open_holds = [h for h in await store.open_holds(conn, user_id) if h[3] >= alive_from]
                    await self.holds.load(user_id, int(row.balance), int(row.version), epoch, open_holds)
                    metrics.REDIS_REBUILDS.inc()
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        finally:
            if self._rebuilds.get(user_id) is future:
                del self._rebuilds[user_id]

    async def live(self, user_id: str) -> tuple[int, int]:
        """(available, held) from Redis, rebuilding a missing mirror first."""
        snap = await self._snapshot(user_id)
        return snap.available, snap.held

    async def _snapshot(self, user_id: str) -> Snapshot:
        for _ in range(5):
            snap = await self.holds.snapshot(user_id, _ms(self.clock()))
            if snap is not None:
                return snap
            await self.rebuild(user_id)
        raise ServiceUnavailable("Could not load the balance; try again.")

    async def catch_up(self, user_id: str, *, at_most_every: float = 0.0) -> bool:
        """Rebuilds the user's Redis state when it is behind PostgreSQL's account version: a sync after
        a commit that never came (the process died in between, or Redis failed just then) would show
        only at the user's next balance change. Such a lapse only ever under-states the credits (a
        lost commit sync leaves its hold counted), so the callers are where that shows: a refused
        reserve, the account read, a refund's claw-back. Returns True when Redis was behind (and is now rebuilt).
        `at_most_every` (seconds) bounds how often one user's refused reserves may look, so a user
        out of credits costs no PostgreSQL read per attempt. Errors are logged, never raised: the
        caller's own answer stands."""
        if at_most_every:
            now = time.monotonic()
            if now - self._caught_up_at.get(user_id, -at_most_every) < at_most_every:
                return False
            if len(self._caught_up_at) >= 10_000:
                self._caught_up_at.clear()  # forgetting only lets some users look once more
            self._caught_up_at[user_id] = now
        try:
            # PostgreSQL first: a commit landing after this read cannot make Redis look behind (only
            # a sync still on its way can, and the rebuild checks again under the lock).
            async with self.engine.connect() as conn:
                found = (await store.balances_of(conn, [user_id])).get(user_id)
            if found is None:
                return False
            snap = await self.holds.snapshot(user_id, _ms(self.clock()))
            if snap is None:
                return True  # just dropped (a hold past its deadline): the caller's retry rebuilds it
            if found[1] <= snap.version:
                return False
            log.warning(
                "Redis was behind PostgreSQL for %s (version %d < %d)", user_id, snap.version, found[1]
            )
            metrics.REDIS_CAUGHT_UP.inc()
            # Rebuilt rather than handed the new balance: when the lost sync was a commit's, its hold
            # is still counted in Redis, and the new balance alone would count the charge twice.
            await self.rebuild(user_id, if_behind=True)
            return True
        except Exception:
            log.exception("checking the Redis state of %s against PostgreSQL failed", user_id)
            return False

    async def resync_failed(self) -> int:
        """Rebuilds the users whose Redis sync failed (Redis unreachable just then); run by the
        sweeper. A failed sync may have been a commit's, whose hold a later sync would not end."""
        users, self._failed_syncs = list(self._failed_syncs), set()
        for i, user_id in enumerate(users):
            try:
                await self.rebuild(user_id, force=True)
            except NotFound:
                pass
            except Exception:
                self._failed_syncs.update(users[i:])  # Redis still failing: the next pass tries again
                raise
        return len(users)

    async def _sync(self, syncs: Sequence[_Sync]) -> None:
        for s in syncs:
            try:
                if s.created:
                    # A new account: overwrite whatever a previous life of this user id left in Redis.
                    await self.rebuild(s.user_id, force=True)
                else:
                    await self.holds.apply(s.user_id, balance=s.balance, version=s.version, ended=s.ended)
            except NotFound:
                raise
            except Exception:
                # PostgreSQL has the change; the sweeper rebuilds this user's Redis state. Meanwhile
                # Redis only under-states (a hold still counted, credits added not yet shown).
                self._failed_syncs.add(s.user_id)
                log.exception("syncing Redis for %s failed", s.user_id)

    # ------------------------------------------------------------ accounts

    async def _create_account(self, conn: AsyncConnection, user_id: str) -> bool:
        created = await store.insert_account(conn, user_id)
        if created and self.settings.signup_credits > 0:
            await store.change_balance(
                conn,
                user_id,
                self.settings.signup_credits,
                "signup_bonus",
                f"signup:{user_id}",
                threshold=self.threshold,
            )
        return created

    async def create_user(self, user_id: str) -> tuple[dict[str, Any], bool]:
        async with self.engine.begin() as conn:
            created = await self._create_account(conn, user_id)
        if created:
            await self._sync([_Sync(user_id, created=True)])
        return await self.account(user_id), created

    async def account(self, user_id: str) -> dict[str, Any]:
        # Redis first: it is synced only after PostgreSQL commits, so the row read next is at least as
        # new as the balance. (Row first could pair a fresh balance with stale purchase fields: 510
        # credits after a 500-credit pack shown with the support tier of no purchase.)
        try:
            snap = await self._snapshot(user_id)
        except NotFound:
            raise NotFound(f"Unknown user {user_id!r}.") from None
        async with self.engine.connect() as conn:
            row = await store.get_account(conn, user_id)
        if row is None:
            raise NotFound(f"Unknown user {user_id!r}.")
        if int(row.version) > snap.version and await self.catch_up(user_id, at_most_every=1.0):
            # Redis was behind: a sync that never came (or one still on its way, then no rebuild).
            snap = await self._snapshot(user_id)
        available, held = snap.available, snap.held
        return {
            "user_id": row.user_id,
            "credits_remaining": available,
            "credits_reserved": held,
            "credits_purchased_total": int(row.credits_purchased_total),
            "credits_lifetime_used": int(row.credits_lifetime_used),
            "credits_owed": int(row.credits_owed),
            "api_access_unlocked": bool(row.api_access_unlocked),
            "tier": row.tier,
            "support_tier": support_tier(int(row.credits_purchased_total)),
            "low_balance": available <= self.threshold,
            "last_purchase_date": row.last_purchase_date,
            "last_purchase_amount": row.last_purchase_amount,
            "created_at": row.created_at,
        }

    async def transactions(self, user_id: str, limit: int, before: int | None) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            if await store.get_account(conn, user_id) is None:
                raise NotFound(f"Unknown user {user_id!r}.")
            rows = await store.transactions(conn, user_id, limit + 1, before)
        return {
            "data": [
                {
                    "id": r.id,
                    "type": r.type,
                    "amount": int(r.amount),
                    "balance_after": int(r.balance_after),
                    "reference": r.reference,
                    "created_at": r.created_at,
                    "details": r.details,
                }
                for r in rows[:limit]
            ],
            "has_more": len(rows) > limit,
        }

    async def _low_balance_event(self, conn: AsyncConnection, user_id: str, balance: int) -> None:
        remaining = balance - await store.open_holds_total(conn, user_id)
        await store.add_outbox(
            conn, BalanceLow(user_id=user_id, credits_remaining=max(remaining, 0), threshold=self.threshold)
        )
        metrics.BALANCE_LOW_EVENTS.inc()

    # ------------------------------------------------------------ credits in

    async def grant(self, user_id: str, credits: int, reason: str, grant_id: str) -> bool:
        """Admin grant (ledger `admin_add`); returns False when this grant id was already applied."""
        reference = f"grant:{user_id}:{grant_id}"
        async with self.engine.begin() as conn:
            created = await self._create_account(conn, user_id)
            await store.get_account(conn, user_id, lock="update")
            if await store.ledger_reference_exists(conn, reference):
                applied, sync = False, _Sync(user_id, created=created)
            else:
                balance, version, _ = await store.change_balance(
                    conn, user_id, credits, "admin_add", reference, threshold=self.threshold, detail=reason
                )
                applied, sync = True, _Sync(user_id, balance, version, created=created)
        await self._sync([sync])
        return applied

    async def migrate_subscriptions(self, users: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
        unknown = sorted({tier for _, tier in users if tier not in MIGRATION_CREDITS})
        if unknown:
            raise InvalidRequest(f"Unknown tier(s): {', '.join(unknown)}; nothing was migrated.")
        results: list[dict[str, Any]] = []
        syncs: list[_Sync] = []
        async with self.engine.begin() as conn:
            for user_id, tier in users:
                created = await self._create_account(conn, user_id)
                await store.get_account(conn, user_id, lock="update")
                reference = f"migration:{user_id}"
                credits = MIGRATION_CREDITS[tier]
                if await store.ledger_reference_exists(conn, reference):
                    results.append(
                        {"user_id": user_id, "tier": tier, "credits": 0, "status": "already_migrated"}
                    )
                    syncs.append(_Sync(user_id, created=created))
                    continue
                balance, version, _ = await store.change_balance(
                    conn, user_id, credits, "migration", reference, threshold=self.threshold, detail=tier
                )
                if tier in MIGRATION_UNLOCKS and await store.unlock_api(conn, user_id):
                    await store.add_outbox(conn, ApiAccessUnlocked(user_id=user_id, purchase_id=None))
                results.append({"user_id": user_id, "tier": tier, "credits": credits, "status": "migrated"})
                syncs.append(_Sync(user_id, balance, version, created=created))
        self._on_outbox()
        await self._sync(syncs)
        return results

    async def apply_purchase(self, event: PackPurchased) -> bool:
        """Credits a purchase exactly once per purchase_id. Returns False for a replay."""
        user_id, purchase_id, credits = event.user_id, event.purchase_id, event.credits
        async with self.engine.begin() as conn:
            created = await self._create_account(conn, user_id)
            account = await store.get_account(conn, user_id, lock="update")
            if await store.get_purchase(conn, purchase_id) is not None:
                replay = True
                # A redelivery may follow a process that died before syncing Redis: sync it now.
                sync = _Sync(user_id, int(account.balance), int(account.version), created=created)
            else:
                replay = False
                await store.insert_purchase(
                    conn,
                    {
                        "purchase_id": purchase_id,
                        "user_id": user_id,
                        "pack": event.pack,
                        "credits": credits,
                        "amount_cents": event.amount_cents,
                        "currency": event.currency.lower(),
                        "unlocks_api": event.unlocks_api,
                    },
                )
                balance, version, crossed = await store.change_balance(
                    conn,
                    user_id,
                    credits,
                    "purchase",
                    f"purchase:{purchase_id}",
                    threshold=self.threshold,
                    purchased=credits,
                )
                await store.record_pack_purchase(conn, user_id, event.pack, credits, self.clock())
                owed = int(account.credits_owed)
                if owed > 0:
                    # Debt from earlier refunds is paid first out of the new credits (never below zero:
                    # the payment is at most the credits just added).
                    pay = min(owed, credits)
                    balance, version, crossed = await store.change_balance(
                        conn,
                        user_id,
                        -pay,
                        "refund_clawback",
                        f"debt:{purchase_id}",
                        threshold=self.threshold,
                    )
                    await store.add_owed(conn, user_id, -pay)
                remaining = balance - await store.open_holds_total(conn, user_id)
                await store.add_outbox(
                    conn,
                    PurchaseApplied(
                        purchase_id=purchase_id, user_id=user_id, credits=credits, credits_remaining=remaining
                    ),
                )
                if event.unlocks_api and await store.unlock_api(conn, user_id):
                    await store.add_outbox(conn, ApiAccessUnlocked(user_id=user_id, purchase_id=purchase_id))
                if crossed:
                    await self._low_balance_event(conn, user_id, balance)
                sync = _Sync(user_id, balance, version, created=created)
        if not replay:
            metrics.PURCHASES_APPLIED.inc()
            self._on_outbox()
        await self._sync([sync])
        return not replay

    async def apply_refund(self, event: PackRefunded) -> bool:
        """`event.credits` is cumulative for the purchase; claws back the part not yet accounted for.

        The purchase row stays locked from the first read to the commit, so concurrent deliveries of
        refunds for one purchase run one after another. The claw-back takes credits through a hold,
        so it can never race a concurrent reserve into a negative available balance; what is not
        available becomes debt (`credits_owed`).
        """
        async with self.engine.begin() as conn:
            purchase = await store.get_purchase(conn, event.purchase_id, for_update=True)
            if purchase is None:
                raise PurchaseNotYetApplied(event.purchase_id)
            user_id = purchase.user_id
            cumulative = min(event.credits, int(purchase.credits))
            want = cumulative - int(purchase.refunded_credits)
            if want <= 0:
                return False  # a replay, or a stale (smaller) cumulative value
            reference = f"refund:{event.purchase_id}:{cumulative}"
            # The claw-back takes what Redis shows available: a Redis left behind by a lost sync (the
            # purchase's own, say) would leave spendable credits out and record them as owed instead.
            await self.catch_up(user_id)
            # The hold is persisted by the hold writer on its own connection (it does not touch the
            # locked purchase). A hold left by an attempt that dies here simply expires.
            hold = await self.reserve(
                user_id, want, None, ttl_seconds=300, up_to=True, kind="clawback", count_metrics=False
            )
            now = self.clock()
            take = 0
            balance = version = None
            if hold is not None:
                take = hold.reservation.amount
                balance, version, crossed = await store.change_balance(
                    conn, user_id, -take, "refund_clawback", reference, threshold=self.threshold
                )
                await store.end_reservation(conn, hold.reservation.id, "committed", now, charged=take)
                if crossed:
                    await self._low_balance_event(conn, user_id, balance)
            else:
                await store.get_account(conn, user_id, lock="update")
            owed = want - take
            if owed:
                await store.add_owed(conn, user_id, owed)
            await store.update_purchase_refund(conn, event.purchase_id, cumulative, take, owed)
            # Money back, for revenue net of refunds (billing's amount_cents is cumulative too).
            cents = min(event.amount_cents, int(purchase.amount_cents))
            await store.record_refund_cents(
                conn,
                event.purchase_id,
                cumulative,
                max(cents, int(purchase.refunded_cents)),
                max(cents - int(purchase.refunded_cents), 0),
                now,
            )
            sync = _Sync(user_id, balance, version, ended=(hold.reservation.id,) if hold else ())
        metrics.REFUNDS_APPLIED.inc()
        self._on_outbox()
        await self._sync([sync])
        return True

    # ------------------------------------------------------------ holds

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
                    user_id, rid, amount, idempotency_key, deadline_ms, _ms(now), up_to=up_to
                )
                if outcome.status != -1:
                    return outcome
                await self.rebuild(user_id)  # raises NotFound for an unknown user
            raise ServiceUnavailable("Could not load the balance; try again.")

        outcome = await place()
        if outcome.status == 0 and await self.catch_up(user_id, at_most_every=1.0):
            outcome = await place()
        if outcome.status == 0:
            if idempotency_key is not None:
                # Redis forgets a key when its hold ends; PostgreSQL remembers it. A retry of a reserve
                # whose reservation was since committed gets that reservation, not a 402.
                async with self.engine.connect() as conn:
                    found = await store.get_reservation_by_key(conn, user_id, idempotency_key)
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
            available, _ = await self.live(user_id)
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
                found = await store.get_reservation_by_key(conn, user_id, idempotency_key)
            if found is None:
                raise ServiceUnavailable("Could not record the reservation; try again.")
            available, _ = await self.live(user_id)
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
        `late`: records taken from the user's pending hash (`drain_pending`), where a hold that was
        still in Redis all along may be past its deadline: it is recorded all the same (and then
        expires, unless its settlement is applied with it)."""
        if not placed:
            return []
        now = self.clock()
        now_ms = _ms(now)
        longest_ms = now_ms + self.settings.max_reservation_ttl_seconds * 1000
        known = await store.known_users(self.pool, sorted({p.user_id for p in placed}))

        async def record(p: HoldToRecord) -> Reservation | AppError:
            if not _is_uuid(p.reservation_id):
                return InvalidRequest("reservation_id must be a UUID.")
            rid = _canonical_uuid(p.reservation_id)
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
                found = await store.get_reservation(conn, rid)
            if found is None or found.user_id != p.user_id or found.amount != p.amount:
                return Conflict(f"Reservation {rid} is already recorded with other terms.")
            if found.status == "released" and found.charged is None:
                return InsufficientCredits(_HOLD_LOST)
            if found.status == "expired":
                return Conflict(f"Reservation {rid} expired before it was recorded.")
            return found

        return list(await asyncio.gather(*(record(p) for p in placed)))

    async def drain_pending(self, user_id: str) -> tuple[int, bool]:
        """Applies what proxies left in the user's pending hash in Redis (see shared/redis_holds.py):
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
                kind, _, rid = name.partition(":")
                try:
                    if kind == "h":
                        amount, deadline_ms, epoch, hold_kind = value.split(" ")
                        records.append(
                            HoldToRecord(rid, user_id, int(amount), epoch, int(deadline_ms), hold_kind)
                        )
                    elif kind == "s":
                        item = orjson.loads(value)
                        amount_ = item.get("amount")
                        about = item.get("details")
                        about_text = None if about is None else orjson.dumps(about).decode()
                        overage = max(int(item.get("overage", 0)), 0)
                        settles.append(
                            (name, rid, str(item["action"]), None if amount_ is None else int(amount_))
                        )
                        settle_details.append(about_text)
                        settle_overages.append(overage)
                    else:
                        raise ValueError(name)
                except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError):
                    log.error("dropping a malformed pending entry of %s: %s=%r", user_id, name, value)
                    done.append(name)
            settling = {rid for _, rid, _, _ in settles}
            keep_ms = _ms(keep_until)
            records = [
                replace(r, deadline_ms=max(r.deadline_ms, keep_ms)) if r.reservation_id in settling else r
                for r in records
            ]
            complete = True
            now_ms = _ms(self.clock())
            lapsed: list[str] = []  # recorded past their deadline with no settlement: they end now
            for record, outcome in zip(records, await self.record_holds(records, late=True), strict=True):
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
                    await store.lock_accounts_key_share(conn, [user_id])
                    ended = await store.expire_holds(conn, lapsed, self.clock())
                metrics.CREDITS_EXPIRED.inc(sum(r.amount for r in records if r.reservation_id in ended))
                await self._sync([_Sync(user_id, ended=tuple(ended))])
            if settles:
                ids = [rid for _, rid, _, _ in settles if _is_uuid(rid)]
                async with self.engine.begin() as conn:
                    await store.extend_open_holds(conn, ids, keep_until)
                outcomes = await self.settle_many(
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
            found = await store.get_reservation(conn, rid, for_update=True)
            if found is None or found.status != "expired" or amount > found.amount:
                return Conflict(f"Reservation {rid} can no longer be committed.")
            account = await store.get_account(conn, found.user_id, lock="update")
            available = int(account.balance) - await store.open_holds_total(conn, found.user_id)
            total = amount + max(overage, 0)
            take = min(total, max(available, 0))
            balance, version, _ = await store.change_balance(
                conn,
                found.user_id,
                -take,
                "usage",
                f"reservation:{rid}:commit",
                threshold=self.threshold,
                used=total,
            )
            if total > take:
                await store.add_owed(conn, found.user_id, total - take)
            await store.end_reservation(conn, rid, "committed", now, charged=amount)
        log.warning("reservation %s charged %d after it expired (%d owed)", rid, total, total - take)
        await self._sync([_Sync(found.user_id, balance, version)])
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

    async def _release_lost(self, user_id: str, rid: str) -> None:
        """Ends a recorded hold that Redis lost (and could not take back) as released, so it can never
        be committed."""
        async with self.engine.begin() as conn:
            await store.lock_accounts_key_share(conn, [user_id])
            await store.end_reservation(conn, rid, "released", self.clock())
        await self._sync([_Sync(user_id, ended=(rid,))])

    async def _undo_hold(self, user_id: str, rid: str) -> None:
        try:
            await self.holds.apply(user_id, ended=(rid,))
        except Exception:
            log.exception("could not drop hold %s from Redis; the sweeper will", rid)

    async def _await_reservation(self, rid: str) -> Reservation:
        """The reservation behind an idempotent replay; its first request may still be persisting it."""
        for _ in range(60):
            async with self.engine.connect() as conn:
                found = await store.get_reservation(conn, rid)
            if found is not None:
                return found
            await asyncio.sleep(0.05)
        raise ServiceUnavailable("The reservation with this idempotency key is still being recorded; retry.")

    async def get_reservation(self, rid: str) -> Reservation:
        if not _is_uuid(rid):
            raise NotFound("Unknown reservation.")
        async with self.engine.connect() as conn:
            found = await store.get_reservation(conn, rid)
        if found is None:
            raise NotFound("Unknown reservation.")
        return found

    async def commit(
        self, rid: str, amount: int | None, details: str | None = None, overage: int = 0
    ) -> SettleResult:
        """`details`: the usage entry's details as JSON text (see api.UsageDetails), or None;
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

        async def settle(rid: str | None, action: str, amount: int | None, about: str | None) -> Any:
            if rid is None:
                return {"outcome": "not_found"}
            if action == "commit":
                return await self.commits.commit(rid, amount, now, self._low_event(now), about)
            return await store.release_fast(self.pool, rid, now)

        canonical = [str(uuid.UUID(rid)) if _is_uuid(rid) else None for rid, _, _ in items]
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
            outcome = row["outcome"]
            if outcome == "not_found":
                results[i] = NotFound("Unknown reservation.")
                continue
            assert rid is not None
            user_id, reserved = row["user_id"], int(row["amount"])
            if action == "commit":
                if outcome == "too_much":
                    results[i] = InvalidRequest(
                        f"amount {amount} exceeds the {row['amount']} credits reserved."
                    )
                elif outcome in ("released", "expired"):
                    results[i] = Conflict(f"Reservation {rid} was {outcome}; it can no longer be committed.")
                elif outcome == "expired_now":
                    metrics.CREDITS_EXPIRED.inc(reserved)
                    results[i] = Conflict(f"Reservation {rid} expired; it can no longer be committed.")
                    syncs.append((i, False, user_id, None, None))
                else:
                    charged = int(row["charged"] or 0)
                    results[i] = SettleResult(rid, charged, reserved - charged, 0)
                    if outcome == "committed":
                        metrics.CREDITS_COMMITTED.inc(charged)
                        metrics.CREDITS_RELEASED.inc(reserved - charged)
                        if row["crossed"]:
                            metrics.BALANCE_LOW_EVENTS.inc()
                            self._on_outbox()
                        syncs.append((i, True, user_id, int(row["balance"]), int(row["version"])))
            else:
                if outcome == "committed":
                    results[i] = Conflict(f"Reservation {rid} was committed; it can no longer be released.")
                    continue
                results[i] = SettleResult(rid, 0, reserved, 0)
                if outcome == "released_now":
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
                self._failed_syncs.update(user for _, _, user, _, _ in syncs)
                log.exception("syncing Redis after %d settlements failed", len(syncs))
        if overages is not None:
            for i, row in enumerate(rows):
                extra = overages[i]
                result = results[i]
                if extra <= 0 or not isinstance(result, SettleResult) or row["outcome"] != "committed":
                    continue  # a replay was charged its overage the first time
                owed = await self._charge_overage(row["user_id"], result.reservation_id, extra)
                available.pop(i, None)
                results[i] = replace(result, overage=extra, owed=owed)
        out: list[SettleResult | AppError] = []
        for i, result in enumerate(results):
            assert result is not None
            if isinstance(result, SettleResult):
                remaining = available.get(i)
                if remaining is None:
                    remaining, _ = await self.live(rows[i]["user_id"])
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

    async def extend_holds(self, items: Sequence[tuple[str, int]]) -> list[dict[str, Any] | AppError]:
        """Moves the deadlines of open holds whose requests are still being served (a long stream) to
        the given times, at most the longest reservation TTL from now and never earlier than they
        were: PostgreSQL first (the sweeper and commits judge by it), then Redis. A hold that has
        ended or is past its deadline is not revived (409). Returns, per item, the reservation's id
        and new `expires_at`, or the refusal."""
        now = self.clock()
        longest_ms = _ms(now) + self.settings.max_reservation_ttl_seconds * 1000
        wanted: dict[str, datetime] = {}
        for rid, deadline_ms in items:
            if _is_uuid(rid):
                wanted[str(uuid.UUID(rid))] = datetime.fromtimestamp(min(deadline_ms, longest_ms) / 1000, UTC)
        extended: dict[str, tuple[str, datetime]] = {}
        if wanted:
            async with self.engine.begin() as conn:
                rows = await store.extend_holds(conn, list(wanted), list(wanted.values()), now)
            extended = {str(r.id): (str(r.user_id), r.expires_at) for r in rows}
            try:
                await self.holds.extend_deadlines(
                    [(user, rid, _ms(expires)) for rid, (user, expires) in extended.items()]
                )
            except Exception:
                # PostgreSQL has the new deadline: past the old one, the scripts drop the account and
                # the rebuild loads the hold with the new one.
                log.exception("moving %d hold deadlines in Redis failed", len(extended))
        out: list[dict[str, Any] | AppError] = []
        for rid, _ in items:
            found = extended.get(str(uuid.UUID(rid))) if _is_uuid(rid) else None
            if found is None:
                out.append(Conflict(f"Reservation {rid} is not held (ended, expired or unknown)."))
            else:
                out.append({"reservation_id": str(uuid.UUID(rid)), "expires_at": found[1]})
        return out

    async def _charge_overage(self, user_id: str, rid: str, extra: int) -> int:
        """Charges `extra` credits a request cost beyond its committed hold (its usage came out above
        the estimate): what is available is taken through a hold of its own, so no concurrent
        reserve can be overdrawn, and the rest is recorded as owed (paid first by the next purchase,
        as a refund's claw-back is). Runs once per hold, after the commit that ended it; a process
        that dies in between leaves the overage uncharged, never charged twice. Returns the owed part."""
        reference = f"reservation:{rid}:overage"
        try:
            held = await self.reserve(
                user_id, extra, None, ttl_seconds=300, up_to=True, kind="overage", count_metrics=False
            )
        except AppError:
            log.exception("holding the overage of %s failed; all of it is recorded as owed", rid)
            held = None
        take = held.reservation.amount if held is not None else 0
        now = self.clock()
        balance = version = None
        async with self.engine.begin() as conn:
            await store.get_account(conn, user_id, lock="update")
            if await store.ledger_reference_exists(conn, reference):
                take = extra = 0  # charged already
                if held is not None:
                    await store.end_reservation(conn, held.reservation.id, "released", now)
            elif take:
                balance, version, crossed = await store.change_balance(
                    conn, user_id, -take, "usage", reference, threshold=self.threshold, used=take
                )
                assert held is not None
                await store.end_reservation(conn, held.reservation.id, "committed", now, charged=take)
                if crossed:
                    await self._low_balance_event(conn, user_id, balance)
            owed = extra - take
            if owed:
                await store.add_owed(conn, user_id, owed)
        metrics.CREDITS_COMMITTED.inc(take)
        self._on_outbox()
        ended = (held.reservation.id,) if held is not None else ()
        await self._sync([_Sync(user_id, balance, version, ended=ended)])
        return owed

    async def roll_up_analytics(self) -> None:
        """Sums the days that ended into ledger_daily (run by the sweeper now and then, so requests
        rarely do it; see migration 0005)."""
        async with self.engine.begin() as conn:
            await store.roll_up_ledger(conn)

    async def analytics(self, first: date | None = None, last: date | None = None) -> dict[str, Any]:
        """The operator's figures for the UTC days first..last (None: unbounded); see analytics.py."""
        async with self.engine.begin() as conn:
            await store.analytics_settings(conn)
            sources = analytics.Sources(
                ledger=await store.ledger_groups(conn, first, last),
                packs=await store.pack_sales(conn, first, last),
                money=await store.money_days(conn, first, last),
                buyers=await store.buyers(conn, first, last),
                accounts=await store.account_facts(conn, first, last),
                cohort=await store.cohort_funnel(conn, first, last) if first else None,
            )
        data = analytics.report(sources)
        data["from"] = first.isoformat() if first else None
        data["to"] = last.isoformat() if last else None
        return data

    # ------------------------------------------------------------ sweeping

    async def expire_due(self, now: datetime | None = None, limit: int = 500) -> int:
        """Ends every hold past its deadline in PostgreSQL (the ledger learns of each), then in Redis."""
        now = now or self.clock()
        total = 0
        while True:
            async with self.engine.begin() as conn:
                expired = await store.expire_due(conn, now, limit)
                if expired:
                    await store.lock_accounts_key_share(conn, [r.user_id for r in expired])
            by_user: dict[str, list[str]] = defaultdict(list)
            for r in expired:
                by_user[r.user_id].append(r.id)
                metrics.CREDITS_EXPIRED.inc(r.amount)
            await self._sync([_Sync(u, ended=tuple(ids)) for u, ids in by_user.items()])
            total += len(expired)
            if len(expired) < limit:
                return total

    async def sweep_redis(self, now: datetime | None = None) -> int:
        """Drops Redis holds whose deadline has passed and that PostgreSQL does not hold open: holds
        that ended while their sync to Redis failed, and holds that never reached PostgreSQL."""
        now = now or self.clock()
        cutoff_ms = int((now.timestamp() - self.settings.orphan_grace_seconds) * 1000)
        dropped = 0
        for shard in range(self.holds.deadline_shards):
            due = await self.holds.due_deadlines(shard, cutoff_ms)
            if not due:
                continue
            ids = [rid for _, _, rid in due if _is_uuid(rid)]
            async with self.engine.connect() as conn:
                statuses = await store.reservation_statuses(conn, ids)
                balances = await store.balances_of(conn, sorted({u for _, u, _ in due}))
            by_user: dict[str, list[str]] = defaultdict(list)
            done: list[str] = []
            for member, user_id, rid in due:
                status = statuses.get(rid)
                if status == "held":
                    continue  # expire_due ends it in PostgreSQL first
                if status is None:
                    metrics.ORPHAN_HOLDS_DROPPED.inc()
                by_user[user_id].append(rid)
                done.append(member)
            for user_id, rids in by_user.items():
                balance, version = balances.get(user_id, (None, None))
                try:
                    await self.holds.apply(user_id, balance=balance, version=version, ended=rids)
                except Exception:
                    log.exception("sweeping Redis holds of %s failed", user_id)
            await self.holds.drop_deadlines(shard, done)
            dropped += len(done)
        return dropped


def valid_user_id(value: str) -> bool:
    """1-200 characters, no control characters (they would break logs, keys and headers)."""
    return 0 < len(value) <= 200 and value.isprintable()


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _canonical_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound("Unknown reservation.") from None


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
