"""Accounts: sign-up (with its credits), the account and its ledger as read by the API, admin grants,
the subscription migration, and the low-balance event other changes write."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from services.credits import metrics
from services.credits.config import CreditsSettings
from services.credits.mirror import Mirror, Sync
from services.credits.stores import accounts as account_store
from services.credits.stores import ledger_entries as ledger_store
from services.credits.stores import outbox as outbox_store
from services.credits.stores import reservations as reservation_store
from shared.errors import InvalidRequest, NotFound
from shared.events import ApiAccessUnlocked, BalanceLow

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


def support_tier(purchased_total: int) -> str:
    for floor, name in SUPPORT_TIERS:
        if purchased_total >= floor:
            return name
    return "Community"


@dataclass(frozen=True)
class Account:
    user_id: str
    credits_remaining: int  # available: the balance less the open holds (Redis)
    credits_reserved: int  # held
    credits_purchased_total: int
    credits_lifetime_used: int
    credits_owed: int
    api_access_unlocked: bool
    tier: str
    support_tier: str
    low_balance: bool
    last_purchase_date: datetime | None
    last_purchase_amount: int | None
    created_at: datetime


@dataclass(frozen=True)
class LedgerEntry:
    id: int
    type: str
    amount: int
    balance_after: int
    reference: str
    created_at: datetime
    details: Any  # the usage entry's details (jsonb), or None


@dataclass(frozen=True)
class LedgerPage:
    entries: list[LedgerEntry]
    has_more: bool


@dataclass(frozen=True)
class Migrated:
    user_id: str
    tier: str
    credits: int
    status: str  # "migrated" or "already_migrated"


async def write_low_balance_event(conn: AsyncConnection, user_id: str, balance: int, threshold: int) -> None:
    """Writes `credits.balance.low` to the outbox in the transaction whose change crossed the threshold."""
    remaining = balance - await reservation_store.open_holds_total(conn, user_id)
    await outbox_store.add_outbox(
        conn, BalanceLow(user_id=user_id, credits_remaining=max(remaining, 0), threshold=threshold)
    )
    metrics.BALANCE_LOW_EVENTS.inc()


class Accounts:
    def __init__(
        self, mirror: Mirror, settings: CreditsSettings, *, on_outbox: Callable[[], None] = lambda: None
    ) -> None:
        self.mirror = mirror
        self.engine = mirror.engine
        self.settings = settings
        self.threshold = settings.low_balance_threshold
        self._on_outbox = on_outbox

    async def create_account(self, conn: AsyncConnection, user_id: str) -> bool:
        """Inserts the account with its signup credits unless it exists; returns whether it was created."""
        created = await account_store.insert_account(conn, user_id)
        if created and self.settings.signup_credits > 0:
            await ledger_store.change_balance(
                conn,
                user_id,
                self.settings.signup_credits,
                "signup_bonus",
                f"signup:{user_id}",
                threshold=self.threshold,
            )
        return created

    async def create_user(self, user_id: str) -> tuple[Account, bool]:
        async with self.engine.begin() as conn:
            created = await self.create_account(conn, user_id)
        if created:
            await self.mirror.sync([Sync(user_id, created=True)])
        return await self.account(user_id), created

    async def account(self, user_id: str) -> Account:
        # Redis first: it is synced only after PostgreSQL commits, so the row read next is at least as
        # new as the balance. (Row first could pair a fresh balance with stale purchase fields: 510
        # credits after a 500-credit pack shown with the support tier of no purchase.)
        try:
            snap = await self.mirror.snapshot(user_id)
        except NotFound:
            raise NotFound(f"Unknown user {user_id!r}.") from None
        async with self.engine.connect() as conn:
            row = await account_store.get_account(conn, user_id)
        if row is None:
            raise NotFound(f"Unknown user {user_id!r}.")
        if int(row.version) > snap.version and await self.mirror.catch_up(user_id, at_most_every=1.0):
            # Redis was behind: a sync that never came (or one still on its way, then no rebuild).
            snap = await self.mirror.snapshot(user_id)
        available, held = snap.available, snap.held
        return Account(
            user_id=row.user_id,
            credits_remaining=available,
            credits_reserved=held,
            credits_purchased_total=int(row.credits_purchased_total),
            credits_lifetime_used=int(row.credits_lifetime_used),
            credits_owed=int(row.credits_owed),
            api_access_unlocked=bool(row.api_access_unlocked),
            tier=row.tier,
            support_tier=support_tier(int(row.credits_purchased_total)),
            low_balance=available <= self.threshold,
            last_purchase_date=row.last_purchase_date,
            last_purchase_amount=row.last_purchase_amount,
            created_at=row.created_at,
        )

    async def transactions(self, user_id: str, limit: int, before: int | None) -> LedgerPage:
        async with self.engine.connect() as conn:
            if await account_store.get_account(conn, user_id) is None:
                raise NotFound(f"Unknown user {user_id!r}.")
            rows = await ledger_store.transactions(conn, user_id, limit + 1, before)
        return LedgerPage(
            entries=[
                LedgerEntry(
                    id=r.id,
                    type=r.type,
                    amount=int(r.amount),
                    balance_after=int(r.balance_after),
                    reference=r.reference,
                    created_at=r.created_at,
                    details=r.details,
                )
                for r in rows[:limit]
            ],
            has_more=len(rows) > limit,
        )

    async def grant(self, user_id: str, credits: int, reason: str, grant_id: str) -> bool:
        """Admin grant (ledger `admin_add`); returns False when this grant id was already applied."""
        reference = f"grant:{user_id}:{grant_id}"
        async with self.engine.begin() as conn:
            created = await self.create_account(conn, user_id)
            await account_store.get_account(conn, user_id, lock="update")
            if await ledger_store.ledger_reference_exists(conn, reference):
                applied, sync = False, Sync(user_id, created=created)
            else:
                balance, version, _ = await ledger_store.change_balance(
                    conn, user_id, credits, "admin_add", reference, threshold=self.threshold, detail=reason
                )
                applied, sync = True, Sync(user_id, balance, version, created=created)
        await self.mirror.sync([sync])
        return applied

    async def migrate_subscriptions(self, users: Sequence[tuple[str, str]]) -> list[Migrated]:
        unknown = sorted({tier for _, tier in users if tier not in MIGRATION_CREDITS})
        if unknown:
            raise InvalidRequest(f"Unknown tier(s): {', '.join(unknown)}; nothing was migrated.")
        results: list[Migrated] = []
        syncs: list[Sync] = []
        async with self.engine.begin() as conn:
            for user_id, tier in users:
                created = await self.create_account(conn, user_id)
                await account_store.get_account(conn, user_id, lock="update")
                reference = f"migration:{user_id}"
                credits = MIGRATION_CREDITS[tier]
                if await ledger_store.ledger_reference_exists(conn, reference):
                    results.append(Migrated(user_id, tier, 0, "already_migrated"))
                    syncs.append(Sync(user_id, created=created))
                    continue
                balance, version, _ = await ledger_store.change_balance(
                    conn, user_id, credits, "migration", reference, threshold=self.threshold, detail=tier
                )
                if tier in MIGRATION_UNLOCKS and await account_store.unlock_api(conn, user_id):
                    await outbox_store.add_outbox(conn, ApiAccessUnlocked(user_id=user_id, purchase_id=None))
                results.append(Migrated(user_id, tier, credits, "migrated"))
                syncs.append(Sync(user_id, balance, version, created=created))
        self._on_outbox()
        await self.mirror.sync(syncs)
        return results
