"""All SQL of the credits service (SQLAlchemy 2.0 Core over asyncpg).

Locking rule that keeps Redis rebuilds exact: every transaction that changes what Redis mirrors for a
user (balance or the set of open holds) locks that user's `accounts` row — `FOR KEY SHARE` at least,
an UPDATE when the balance moves — and a rebuild reads the snapshot under `FOR UPDATE` and loads Redis
before it commits. So a rebuild never loads a snapshot that a concurrent change has already overtaken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared import outbox
from shared.events import Event

ACCOUNT_COLUMNS = (
    "user_id, balance, credits_purchased_total, credits_lifetime_used, credits_owed, api_access_unlocked, "
    "tier, tier_credits, low_balance_notified, last_purchase_date, last_purchase_amount, version, created_at"
)


@dataclass(frozen=True)
class Reservation:
    id: str
    user_id: str
    amount: int
    idempotency_key: str | None
    kind: str
    status: str
    charged: int | None
    expires_at: datetime
    created_at: datetime


@dataclass(frozen=True)
class NewHold:
    id: str
    user_id: str
    amount: int
    idempotency_key: str | None
    kind: str
    expires_at: datetime


def _reservation(row: Any) -> Reservation:
    return Reservation(
        id=str(row.id),
        user_id=row.user_id,
        amount=row.amount,
        idempotency_key=row.idempotency_key,
        kind=row.kind,
        status=row.status,
        charged=row.charged,
        expires_at=row.expires_at,
        created_at=row.created_at,
    )


RES_COLUMNS = "id, user_id, amount, idempotency_key, kind, status, charged, expires_at, created_at"

# ---------------------------------------------------------------- accounts


async def insert_account(conn: AsyncConnection, user_id: str) -> bool:
    row = (
        await conn.execute(
            text(
                "INSERT INTO accounts (user_id) VALUES (:u) ON CONFLICT (user_id) DO NOTHING RETURNING user_id"
            ),
            {"u": user_id},
        )
    ).first()
    return row is not None


async def get_account(conn: AsyncConnection, user_id: str, lock: str = "") -> Any:
    suffix = {"": "", "update": " FOR UPDATE", "key_share": " FOR KEY SHARE"}[lock]
    return (
        await conn.execute(
            text(f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE user_id = :u{suffix}"), {"u": user_id}
        )
    ).first()


async def lock_accounts_key_share(conn: AsyncConnection, user_ids: Sequence[str]) -> None:
    await conn.execute(
        text("SELECT 1 FROM accounts WHERE user_id = ANY(CAST(:u AS text[])) ORDER BY user_id FOR KEY SHARE"),
        {"u": sorted(set(user_ids))},
    )


async def ledger_reference_exists(conn: AsyncConnection, reference: str) -> bool:
    row = (
        await conn.execute(text("SELECT 1 FROM ledger_entries WHERE reference = :r"), {"r": reference})
    ).first()
    return row is not None


async def change_balance(
    conn: AsyncConnection,
    user_id: str,
    amount: int,
    entry_type: str,
    reference: str,
    *,
    threshold: int,
    purchased: int = 0,
    used: int = 0,
    detail: str | None = None,
) -> tuple[int, int, bool]:
    """Adds a signed ledger entry and moves the cached balance in the same transaction.

    Returns (balance_after, version, low_balance_crossed): crossed is true when this change takes the
    balance from above the threshold to at or below it, i.e. once per downward crossing.
    """
    # One statement, one row lock. The crossing is judged from the balance before and after this
    # change (serialised by the row lock); `low_balance_notified` records that the balance is low.
    row = (
        await conn.execute(
            text(
                """
                UPDATE accounts SET
                    balance = balance + :a,
                    credits_purchased_total = credits_purchased_total + :p,
                    credits_lifetime_used = credits_lifetime_used + :used,
                    version = version + 1,
                    low_balance_notified = CASE
                        WHEN balance + :a > :t THEN false
                        WHEN :a < 0 AND balance + :a <= :t THEN true
                        ELSE low_balance_notified END
                WHERE user_id = :u
                RETURNING balance, version
                """
            ),
            {"a": amount, "p": purchased, "used": used, "t": threshold, "u": user_id},
        )
    ).one()
    if amount != 0:
        await conn.execute(
            text(
                "INSERT INTO ledger_entries (user_id, type, amount, balance_after, reference, detail) "
                "VALUES (:u, :t, :a, :b, :r, :d)"
            ),
            {"u": user_id, "t": entry_type, "a": amount, "b": row.balance, "r": reference, "d": detail},
        )
    before = int(row.balance) - amount
    crossed = amount < 0 and before > threshold >= int(row.balance)
    return int(row.balance), int(row.version), crossed


async def open_holds_total(conn: AsyncConnection, user_id: str) -> int:
    return int(
        (
            await conn.execute(
                text(
                    "SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE user_id = :u AND status = 'held'"
                ),
                {"u": user_id},
            )
        ).scalar_one()
    )


async def next_redis_epoch(conn: AsyncConnection, user_id: str) -> int:
    return int(
        (
            await conn.execute(
                text(
                    "UPDATE accounts SET redis_epoch = redis_epoch + 1 WHERE user_id = :u RETURNING redis_epoch"
                ),
                {"u": user_id},
            )
        ).scalar_one()
    )


async def open_holds(conn: AsyncConnection, user_id: str) -> list[tuple[str, int, str | None, int]]:
    """(reservation_id, amount, idempotency_key, deadline in ms since the epoch) of the open holds."""
    rows = await conn.execute(
        text(
            "SELECT id, amount, idempotency_key, expires_at FROM reservations WHERE user_id = :u AND status = 'held'"
        ),
        {"u": user_id},
    )
    return [(str(r.id), int(r.amount), r.idempotency_key, int(r.expires_at.timestamp() * 1000)) for r in rows]


async def unlock_api(conn: AsyncConnection, user_id: str) -> bool:
    """Returns true only for the first unlock."""
    row = (
        await conn.execute(
            text(
                "UPDATE accounts SET api_access_unlocked = true WHERE user_id = :u AND NOT api_access_unlocked "
                "RETURNING user_id"
            ),
            {"u": user_id},
        )
    ).first()
    return row is not None


async def record_pack_purchase(
    conn: AsyncConnection, user_id: str, pack: str, credits: int, when: datetime
) -> None:
    await conn.execute(
        text(
            """
            UPDATE accounts SET
                last_purchase_date = :w, last_purchase_amount = :c,
                tier = CASE WHEN :c > tier_credits THEN :p ELSE tier END,
                tier_credits = GREATEST(tier_credits, :c)
            WHERE user_id = :u
            """
        ),
        {"w": when, "c": credits, "p": pack, "u": user_id},
    )


async def add_owed(conn: AsyncConnection, user_id: str, delta: int) -> None:
    await conn.execute(
        text("UPDATE accounts SET credits_owed = credits_owed + :d WHERE user_id = :u"),
        {"d": delta, "u": user_id},
    )


# ---------------------------------------------------------------- ledger reads


async def transactions(conn: AsyncConnection, user_id: str, limit: int, before: int | None) -> list[Any]:
    query = (
        "SELECT id, type, amount, balance_after, reference, details, created_at FROM ledger_entries"
        " WHERE user_id = :u" + (" AND id < :b" if before is not None else "") + " ORDER BY id DESC LIMIT :l"
    )
    return list((await conn.execute(text(query), {"u": user_id, "b": before, "l": limit})).all())


# ---------------------------------------------------------------- reservations


async def get_reservation(
    conn: AsyncConnection, reservation_id: str, *, for_update: bool = False
) -> Reservation | None:
    row = (
        await conn.execute(
            text(
                f"SELECT {RES_COLUMNS} FROM reservations WHERE id = :id"
                + (" FOR UPDATE" if for_update else "")
            ),
            {"id": reservation_id},
        )
    ).first()
    return _reservation(row) if row else None


async def get_reservation_by_key(conn: AsyncConnection, user_id: str, key: str) -> Reservation | None:
    row = (
        await conn.execute(
            text(f"SELECT {RES_COLUMNS} FROM reservations WHERE user_id = :u AND idempotency_key = :k"),
            {"u": user_id, "k": key},
        )
    ).first()
    return _reservation(row) if row else None


async def end_reservation(
    conn: AsyncConnection, reservation_id: str, status: str, when: datetime, charged: int | None = None
) -> None:
    await conn.execute(
        text("UPDATE reservations SET status = :s, charged = :c, ended_at = :w WHERE id = :id"),
        {"s": status, "c": charged, "w": when, "id": reservation_id},
    )


async def extend_open_holds(conn: AsyncConnection, ids: Sequence[str], until: datetime) -> None:
    """Moves the deadline of open holds to at least `until` (their settlement has arrived late)."""
    if ids:
        await conn.execute(
            text(
                "UPDATE reservations SET expires_at = :t "
                "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'held' AND expires_at < :t"
            ),
            {"ids": list(ids), "t": until},
        )


async def expire_holds(conn: AsyncConnection, ids: Sequence[str], now: datetime) -> list[str]:
    """Ends the given holds as expired if still open; returns those it ended."""
    if not ids:
        return []
    rows = await conn.execute(
        text(
            "UPDATE reservations SET status = 'expired', ended_at = :now "
            "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'held' RETURNING id"
        ),
        {"ids": list(ids), "now": now},
    )
    return [str(r.id) for r in rows]


async def expire_due(conn: AsyncConnection, now: datetime, limit: int) -> list[Reservation]:
    rows = await conn.execute(
        text(
            f"""
            UPDATE reservations SET status = 'expired', ended_at = :now
            WHERE id IN (
                SELECT id FROM reservations WHERE status = 'held' AND expires_at <= :now
                ORDER BY expires_at LIMIT :l FOR UPDATE SKIP LOCKED)
            RETURNING {RES_COLUMNS}
            """
        ),
        {"now": now, "l": limit},
    )
    return [_reservation(r) for r in rows]


async def extend_holds(
    conn: AsyncConnection, ids: Sequence[str], deadlines: Sequence[datetime], now: datetime
) -> list[Any]:
    """Moves the deadlines of open holds later (never earlier); a hold that ended or is past its
    deadline stays as it is. Returns (id, user_id, expires_at) of the holds extended. The accounts
    are locked KEY SHARE first, as for every hold change Redis mirrors (a rebuild waits for it)."""
    users = await conn.execute(
        text("SELECT DISTINCT user_id FROM reservations WHERE id = ANY(CAST(:ids AS uuid[]))"),
        {"ids": list(ids)},
    )
    await lock_accounts_key_share(conn, [r.user_id for r in users])
    rows = await conn.execute(
        text(
            """
            UPDATE reservations r SET expires_at = GREATEST(r.expires_at, w.deadline)
            FROM unnest(CAST(:ids AS uuid[]), CAST(:deadlines AS timestamptz[])) AS w(id, deadline)
            WHERE r.id = w.id AND r.status = 'held' AND r.expires_at > :now
            RETURNING r.id, r.user_id, r.expires_at
            """
        ),
        {"ids": list(ids), "deadlines": list(deadlines), "now": now},
    )
    return list(rows)


async def reservation_statuses(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, str]:
    rows = await conn.execute(
        text("SELECT id, status FROM reservations WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": list(ids)}
    )
    return {str(r.id): r.status for r in rows}


async def balances_of(conn: AsyncConnection, user_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    rows = await conn.execute(
        text("SELECT user_id, balance, version FROM accounts WHERE user_id = ANY(CAST(:u AS text[]))"),
        {"u": list(user_ids)},
    )
    return {r.user_id: (int(r.balance), int(r.version)) for r in rows}


# ---------------------------------------------------------------- hot path (raw asyncpg, one round trip each)
# The functions live in migration 0002; they run the same statements as above as one server-side call.


async def known_users(pool: asyncpg.Pool, user_ids: Sequence[str]) -> set[str]:
    rows = await pool.fetch("SELECT user_id FROM accounts WHERE user_id = ANY($1::text[])", list(user_ids))
    return {str(r["user_id"]) for r in rows}


async def insert_holds_fast(conn: asyncpg.Connection, holds: Sequence[NewHold]) -> dict[str, int]:
    """Inserts a batch of holds; returns {inserted id: the account's Redis epoch}. A hold whose
    idempotency key already has a reservation is not inserted."""
    rows = await conn.fetch(
        "SELECT * FROM credits_insert_holds($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[],"
        " $6::timestamptz[])",
        [h.id for h in holds],
        [h.user_id for h in holds],
        [h.amount for h in holds],
        [h.idempotency_key for h in holds],
        [h.kind for h in holds],
        [h.expires_at for h in holds],
    )
    return {str(r["hold_id"]): int(r["epoch"]) for r in rows}


async def commit_fast(
    pool: asyncpg.Pool,
    reservation_id: str,
    amount: int | None,
    now: datetime,
    threshold: int,
    low_event: str,
    details: str | None = None,
) -> Any:
    """Returns (outcome, user_id, amount, charged, balance, version, crossed); see migrations 0002 and
    0005 (`details`, JSON text, is kept on the usage entry)."""
    return await pool.fetchrow(
        "SELECT * FROM credits_commit($1::uuid, $2, $3, $4, $5::jsonb, $6::jsonb)",
        reservation_id,
        amount,
        now,
        threshold,
        low_event,
        details,
    )


async def commit_batch_fast(
    conn: asyncpg.Connection,
    ids: Sequence[str],
    amounts: Sequence[int | None],
    now: datetime,
    threshold: int,
    low_events: Sequence[str],
    details: Sequence[str | None] | None = None,
) -> list[Any]:
    """One row per id (in lock order, not input order): (reservation_id, outcome, user_id, amount,
    charged, balance, version, crossed); see migrations 0002, 0003 and 0005 (`details`: JSON text per
    id, or None, kept on its usage entry)."""
    return list(
        await conn.fetch(
            "SELECT * FROM credits_commit_batch($1::uuid[], $2::bigint[], $3, $4, $5::jsonb[], $6::jsonb[])",
            list(ids),
            list(amounts),
            now,
            threshold,
            list(low_events),
            list(details) if details is not None else None,
        )
    )


async def release_fast(pool: asyncpg.Pool, reservation_id: str, now: datetime) -> Any:
    """Returns (outcome, user_id, amount); see migration 0002."""
    return await pool.fetchrow("SELECT * FROM credits_release($1::uuid, $2)", reservation_id, now)


# ---------------------------------------------------------------- purchases


async def get_purchase(conn: AsyncConnection, purchase_id: str, *, for_update: bool = False) -> Any:
    return (
        await conn.execute(
            text("SELECT * FROM purchases WHERE purchase_id = :p" + (" FOR UPDATE" if for_update else "")),
            {"p": purchase_id},
        )
    ).first()


async def insert_purchase(conn: AsyncConnection, values: dict[str, Any]) -> None:
    await conn.execute(
        text(
            "INSERT INTO purchases (purchase_id, user_id, pack, credits, amount_cents, currency, unlocks_api) "
            "VALUES (:purchase_id, :user_id, :pack, :credits, :amount_cents, :currency, :unlocks_api)"
        ),
        values,
    )


async def update_purchase_refund(
    conn: AsyncConnection, purchase_id: str, refunded: int, clawed_back: int, owed: int
) -> None:
    await conn.execute(
        text(
            "UPDATE purchases SET refunded_credits = :r, clawed_back = clawed_back + :c, "
            "owed_recorded = owed_recorded + :o WHERE purchase_id = :p"
        ),
        {"r": refunded, "c": clawed_back, "o": owed, "p": purchase_id},
    )


async def record_refund_cents(
    conn: AsyncConnection,
    purchase_id: str,
    cumulative_credits: int,
    cumulative_cents: int,
    step_cents: int,
    when: datetime,
) -> None:
    """A refund step in money (`step_cents`: billing's cumulative cents less what earlier steps recorded)."""
    await conn.execute(
        text("UPDATE purchases SET refunded_cents = :cents WHERE purchase_id = :p"),
        {"p": purchase_id, "cents": cumulative_cents},
    )
    await conn.execute(
        text(
            "INSERT INTO purchase_refunds (purchase_id, cumulative_credits, cents, refunded_at) "
            "VALUES (:p, :credits, :step, :w) ON CONFLICT DO NOTHING"
        ),
        {"p": purchase_id, "credits": cumulative_credits, "step": step_cents, "w": when},
    )


# ---------------------------------------------------------------- api keys


async def insert_api_key(
    conn: AsyncConnection, key_id: str, user_id: str, name: str | None, prefix: str, key_hash: str
) -> Any:
    return (
        await conn.execute(
            text(
                "INSERT INTO api_keys (id, user_id, name, prefix, key_hash) VALUES (:i, :u, :n, :p, :h) "
                "RETURNING id, name, prefix, created_at, revoked_at"
            ),
            {"i": key_id, "u": user_id, "n": name, "p": prefix, "h": key_hash},
        )
    ).one()


async def list_api_keys(conn: AsyncConnection, user_id: str) -> list[Any]:
    rows = await conn.execute(
        text(
            "SELECT id, name, prefix, created_at, revoked_at FROM api_keys WHERE user_id = :u "
            "ORDER BY created_at, id"
        ),
        {"u": user_id},
    )
    return list(rows)


async def revoke_api_key(conn: AsyncConnection, user_id: str, key_id: str, when: datetime) -> Any:
    return (
        await conn.execute(
            text(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, :w) WHERE id = :i AND user_id = :u "
                "RETURNING id, name, prefix, created_at, revoked_at"
            ),
            {"w": when, "i": key_id, "u": user_id},
        )
    ).first()


async def find_api_key(conn: AsyncConnection, key_hash: str) -> Any:
    return (
        await conn.execute(
            text(
                "SELECT k.id, k.user_id, k.revoked_at, a.api_access_unlocked FROM api_keys k "
                "JOIN accounts a ON a.user_id = k.user_id WHERE k.key_hash = :h"
            ),
            {"h": key_hash},
        )
    ).first()


# ---------------------------------------------------------------- analytics
# Whole days of the ledger come from `ledger_daily` (rolled up by credits_roll_up_ledger(), migration
# 0005), the rest from `ledger_entries` by its created_at index; purchases, refunds and accounts are
# read by their date indexes. Each statement below is one pass over what it reads.


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _bounds(column: str, lo: datetime | None, hi: datetime | None) -> str:
    """SQL conditions `lo <= column < hi` for the bounds that are set (the values bound as :lo/:hi)."""
    parts = ["true"]
    if lo is not None:
        parts.append(f"{column} >= :lo")
    if hi is not None:
        parts.append(f"{column} < :hi")
    return " AND ".join(parts)


async def roll_up_ledger(conn: AsyncConnection) -> date | None:
    """Sums the whole days not yet in ledger_daily (a no-op when up to date); returns the last day
    summed (None: the ledger is empty and nothing was ever summed)."""
    rolled: date | None = (await conn.execute(text("SELECT credits_roll_up_ledger()"))).scalar_one()
    return rolled


@dataclass(frozen=True)
class LedgerGroup:
    """One grouping of the ledger over the range: by type alone, or with its operation, model or day."""

    day: date | None
    type: str
    operation: str | None
    model: str | None
    entries: int
    credits: int
    costed_credits: int
    upstream_cost_usd: float


async def ledger_groups(conn: AsyncConnection, first: date | None, last: date | None) -> list[LedgerGroup]:
    rolled = await roll_up_ledger(conn)
    lo = _day_start(first) if first else None
    hi = _day_start(last + timedelta(days=1)) if last else None
    live_lo = lo
    if rolled is not None:
        rolled_end = _day_start(rolled + timedelta(days=1))
        live_lo = max(lo, rolled_end) if lo else rolled_end
    daily_where = ["d.day <= :rolled" if rolled is not None else "false"]
    if first is not None:
        daily_where.append("d.day >= :first")
    if last is not None:
        daily_where.append("d.day <= :last")
    live_where = _bounds("e.created_at", live_lo, hi)
    query = f"""
        WITH days AS (
            SELECT d.day, d.type, d.operation, d.model, d.entries, d.credits, d.costed_credits,
                   d.upstream_cost_usd
            FROM ledger_daily d WHERE {" AND ".join(daily_where)}
            UNION ALL
            SELECT (e.created_at AT TIME ZONE 'UTC')::date, e.type,
                   COALESCE(e.details ->> 'operation', ''), COALESCE(e.details ->> 'model', ''),
                   count(*), sum(e.amount),
                   COALESCE(sum(-e.amount) FILTER (WHERE e.details ->> 'upstream_cost_usd' IS NOT NULL), 0),
                   COALESCE(sum((e.details ->> 'upstream_cost_usd')::numeric), 0)
            FROM ledger_entries e WHERE {live_where}
            GROUP BY 1, 2, 3, 4
        )
        SELECT day, type, operation, model, GROUPING(day, operation, model) AS grouped,
               sum(entries) AS entries, sum(credits) AS credits, sum(costed_credits) AS costed_credits,
               sum(upstream_cost_usd) AS upstream_cost_usd
        FROM days
        GROUP BY GROUPING SETS ((type), (type, operation), (type, model), (day, type))
    """
    rows = await conn.execute(
        text(query), {"rolled": rolled, "first": first, "last": last, "lo": live_lo, "hi": hi}
    )
    groups = []
    for r in rows:
        # GROUPING() sets a bit per column summed away: day 4, operation 2, model 1.
        groups.append(
            LedgerGroup(
                day=r.day if not r.grouped & 4 else None,
                type=r.type,
                operation=r.operation if not r.grouped & 2 else None,
                model=r.model if not r.grouped & 1 else None,
                entries=int(r.entries),
                credits=int(r.credits),
                costed_credits=int(r.costed_credits),
                upstream_cost_usd=float(r.upstream_cost_usd),
            )
        )
    return groups


@dataclass(frozen=True)
class _Split:
    """A range cut where the daily rollups end: whole days up to `rolled` come from the *_daily
    tables, the rest (`lo`..`hi`) from the base tables."""

    first: date | None
    last: date | None
    rolled: date | None
    lo: datetime | None  # start of what the base tables supply
    hi: datetime | None  # end of the range (exclusive)

    def daily(self, column: str) -> str:
        """SQL conditions on a rollup's day column (bound as :rolled/:first/:last)."""
        parts = [f"{column} <= :rolled" if self.rolled is not None else "false"]
        if self.first is not None:
            parts.append(f"{column} >= :first")
        if self.last is not None:
            parts.append(f"{column} <= :last")
        return " AND ".join(parts)

    def live(self, column: str) -> str:
        return _bounds(column, self.lo, self.hi)

    def params(self) -> dict[str, Any]:
        return {"rolled": self.rolled, "first": self.first, "last": self.last, "lo": self.lo, "hi": self.hi}


async def _split(conn: AsyncConnection, first: date | None, last: date | None) -> _Split:
    rolled: date | None = (
        await conn.execute(text("SELECT rolled_through FROM ledger_daily_state"))
    ).scalar_one()
    return _cut(rolled, first, last)


def _cut(rolled: date | None, first: date | None, last: date | None) -> _Split:
    lo = _day_start(first) if first else None
    if rolled is not None:
        rolled_end = _day_start(rolled + timedelta(days=1))
        lo = max(lo, rolled_end) if lo else rolled_end
    hi = _day_start(last + timedelta(days=1)) if last else None
    return _Split(first, last, rolled, lo, hi)


async def pack_sales(conn: AsyncConnection, first: date | None, last: date | None) -> list[Any]:
    """Per pack over the range: packs sold, their cents and credits, the latest price and credits of
    the pack, and the cents refunded in the range (of purchases of any date)."""
    cut = await _split(conn, first, last)
    query = f"""
        WITH sales AS (
            SELECT pack, sum(sold) AS sold, sum(cents) AS cents, sum(refunded) AS refunded_cents
            FROM (
                SELECT d.pack, d.sold, d.cents, d.refunded_cents AS refunded
                FROM purchases_daily d WHERE {cut.daily("d.day")}
                UNION ALL
                SELECT pack, 1, amount_cents, 0 FROM purchases WHERE {cut.live("applied_at")}
                UNION ALL
                SELECT p.pack, 0, 0, r.cents
                FROM purchase_refunds r JOIN purchases p ON p.purchase_id = r.purchase_id
                WHERE {cut.live("r.refunded_at")}
            ) x
            GROUP BY pack
        )
        SELECT s.pack, s.sold, s.cents, s.refunded_cents, latest.amount_cents AS price_cents,
               latest.credits AS pack_credits
        FROM sales s
        -- The pack's price and credits: those of its latest purchase up to the end of the range.
        CROSS JOIN LATERAL (
            SELECT q.amount_cents, q.credits FROM purchases q
            WHERE q.pack = s.pack {"AND q.applied_at < :hi" if cut.hi is not None else ""}
            ORDER BY q.applied_at DESC, q.purchase_id DESC LIMIT 1
        ) latest
        ORDER BY 5, 1
    """
    return list(await conn.execute(text(query), cut.params()))


async def money_days(conn: AsyncConnection, first: date | None, last: date | None) -> list[Any]:
    """Per UTC day: revenue net of refunds, packs sold, paying users (distinct buyers that day)."""
    cut = await _split(conn, first, last)
    query = f"""
        SELECT day, sum(cents) AS revenue_cents, sum(sold) AS packs_sold, sum(payers) AS paying_users
        FROM (
            SELECT d.day, sum(d.cents - d.refunded_cents) AS cents, sum(d.sold) AS sold, 0 AS payers
            FROM purchases_daily d WHERE {cut.daily("d.day")} GROUP BY d.day
            UNION ALL
            SELECT b.day, 0, 0, b.payers FROM buyers_daily b WHERE {cut.daily("b.day")}
            UNION ALL
            SELECT day, sum(cents), count(user_id), count(DISTINCT user_id)
            FROM (
                SELECT (applied_at AT TIME ZONE 'UTC')::date AS day, amount_cents AS cents, user_id
                FROM purchases WHERE {cut.live("applied_at")}
                UNION ALL
                SELECT (refunded_at AT TIME ZONE 'UTC')::date, -cents, NULL
                FROM purchase_refunds WHERE {cut.live("refunded_at")}
            ) m
            GROUP BY day
        ) x
        GROUP BY day
    """
    return list(await conn.execute(text(query), cut.params()))


async def buyers(conn: AsyncConnection, first: date | None, last: date | None) -> Any:
    """Users who ever bought by the end of the range and of them those who bought twice (whole days
    from buyers_daily); paying users in the range and of them those with 2+ purchases in it (the
    same for a range open at the start, else one pass over the range's purchases); the median days
    between a purchase in the range and the same user's previous purchase (purchase_gaps)."""
    cut = await _split(conn, first, last)
    upto = _cut(cut.rolled, None, last)  # everything up to the end of the range
    # Each live purchase's rank among its user's purchases and the time since the previous one.
    earlier = "(q.applied_at, q.purchase_id) < (p.applied_at, p.purchase_id)"
    if first is None:
        in_range = "SELECT ever_bought AS paying, bought_twice AS repeat FROM ever"
    else:
        in_range = f"""
            SELECT count(*) AS paying, count(*) FILTER (WHERE n >= 2) AS repeat
            FROM (SELECT count(*) AS n FROM purchases
                  WHERE applied_at >= :range_lo {"AND applied_at < :hi" if cut.hi else ""} GROUP BY user_id) u
        """
    query = f"""
        WITH live AS (
            SELECT p.applied_at,
                   (SELECT count(*) FROM (SELECT 1 FROM purchases q WHERE q.user_id = p.user_id AND {earlier}
                                          LIMIT 2) two) AS earlier,
                   extract(epoch FROM p.applied_at - (
                       SELECT q.applied_at FROM purchases q WHERE q.user_id = p.user_id AND {earlier}
                       ORDER BY q.applied_at DESC, q.purchase_id DESC LIMIT 1)) / 86400 AS days
            FROM purchases p WHERE {_bounds("p.applied_at", upto.lo, upto.hi)}
        ), ever AS (
            SELECT COALESCE(sum(first_buyers), 0) AS ever_bought, COALESCE(sum(second_buyers), 0) AS bought_twice
            FROM (
                SELECT b.first_buyers, b.second_buyers FROM buyers_daily b
                WHERE {upto.daily("b.day")}
                UNION ALL
                SELECT count(*) FILTER (WHERE earlier = 0), count(*) FILTER (WHERE earlier = 1) FROM live
            ) x
        )
        SELECT r.paying, r.repeat, e.ever_bought, e.bought_twice,
               (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY days) FROM (
                    SELECT g.days FROM purchase_gaps g WHERE {cut.daily("g.day")}
                    UNION ALL
                    SELECT days FROM live WHERE days IS NOT NULL
                    {"AND applied_at >= :range_lo" if first is not None else ""}
                ) gaps) AS median_days
        FROM ever e CROSS JOIN ({in_range}) r
    """
    params = cut.params() | {"lo": upto.lo, "range_lo": _day_start(first) if first else None}
    return (await conn.execute(text(query), params)).one()


@dataclass(frozen=True)
class AccountFacts:
    tiers: dict[str, int]  # users per current tier, of the accounts that exist at the end of the range
    remaining: int  # their balances now
    signups: list[tuple[date, int]]  # users who signed up, per day of the range


async def account_facts(conn: AsyncConnection, first: date | None, last: date | None) -> AccountFacts:
    """From account_tiers (kept on write) less the accounts created after the range (by the
    created_at index: none for a range up to today); balances as the ledger's sum (a balance is
    the sum of its ledger entries: ledger_daily plus the entries since); sign-ups per day from
    signups_daily plus the accounts created since."""
    cut = await _split(conn, first, last)
    later = "accounts WHERE created_at >= :hi" if cut.hi is not None else "accounts WHERE false"
    tiers = await conn.execute(
        text(
            f"""
            SELECT t.tier, t.users - COALESCE(l.users, 0) AS users
            FROM account_tiers t
            LEFT JOIN (SELECT tier, count(*) AS users FROM {later} GROUP BY tier) l ON l.tier = t.tier
            """
        ),
        cut.params(),
    )
    # The ledger up to now, whatever the range: whole days rolled up, the rest read.
    since = _bounds("created_at", _day_start(cut.rolled + timedelta(days=1)) if cut.rolled else None, None)
    remaining = (
        await conn.execute(
            text(
                f"""
                SELECT COALESCE((SELECT sum(credits) FROM ledger_daily WHERE day <= :rolled), 0)
                     + COALESCE((SELECT sum(amount) FROM ledger_entries WHERE {since}), 0)
                     - COALESCE((SELECT sum(balance) FROM {later}), 0)
                """
            ),
            cut.params() | {"lo": _day_start(cut.rolled + timedelta(days=1)) if cut.rolled else None},
        )
    ).scalar_one()
    signups = await conn.execute(
        text(
            f"""
            SELECT day, sum(users) AS users FROM (
                SELECT s.day, s.users FROM signups_daily s WHERE {cut.daily("s.day")}
                UNION ALL
                SELECT (created_at AT TIME ZONE 'UTC')::date, count(*) FROM accounts
                WHERE {cut.live("created_at")} GROUP BY 1
            ) x
            GROUP BY day
            """
        ),
        cut.params(),
    )
    return AccountFacts(
        tiers={r.tier: int(r.users) for r in tiers if r.users > 0},
        remaining=int(remaining),
        signups=[(r.day, int(r.users)) for r in signups],
    )


async def cohort_funnel(conn: AsyncConnection, first: date, last: date | None) -> Any:
    """Of the users who signed up in the range (by the accounts' created_at index): how many bought by
    the end of the range, and bought twice (at most two purchases looked up per user)."""
    lo = _day_start(first)
    hi = _day_start(last + timedelta(days=1)) if last else None
    query = f"""
        SELECT count(*) AS signed_up, count(*) FILTER (WHERE c.n >= 1) AS bought,
               count(*) FILTER (WHERE c.n >= 2) AS bought_again
        FROM accounts a
        CROSS JOIN LATERAL (
            SELECT count(*) AS n FROM (
                SELECT 1 FROM purchases p
                WHERE p.user_id = a.user_id {"AND p.applied_at < :hi" if hi is not None else ""} LIMIT 2
            ) two
        ) c
        WHERE {_bounds("a.created_at", lo, hi)}
    """
    return (await conn.execute(text(query), {"lo": lo, "hi": hi})).one()


async def analytics_settings(conn: AsyncConnection) -> None:
    """For this transaction: each statement planned for its own bounds (a generic plan of
    `created_at >= $1` guesses a third of the table and scans it all), and sorts and hashes of a
    hundred thousand accounts in memory rather than on disk."""
    await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
    await conn.execute(text("SET LOCAL work_mem = '64MB'"))


# ---------------------------------------------------------------- outbox


async def add_outbox(conn: AsyncConnection, event: Event) -> None:
    await outbox.enqueue(conn, event)
