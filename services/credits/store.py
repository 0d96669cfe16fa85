"""All SQL of the credits service (SQLAlchemy 2.0 Core over asyncpg).

Locking rule that keeps Redis rebuilds exact: every transaction that changes what Redis mirrors for a
user (balance or the set of open holds) locks that user's `accounts` row — `FOR KEY SHARE` at least,
an UPDATE when the balance moves — and a rebuild reads the snapshot under `FOR UPDATE` and loads Redis
before it commits. So a rebuild never loads a snapshot that a concurrent change has already overtaken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.events import Event
from shared.logs import current_request_id

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


async def set_account_flags(conn: AsyncConnection, user_id: str, **values: Any) -> None:
    assignments = ", ".join(f"{k} = :{k}" for k in values)
    await conn.execute(
        text(f"UPDATE accounts SET {assignments} WHERE user_id = :u"), {**values, "u": user_id}
    )


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
        "SELECT id, type, amount, balance_after, reference, created_at FROM ledger_entries WHERE user_id = :u"
        + (" AND id < :b" if before is not None else "")
        + " ORDER BY id DESC LIMIT :l"
    )
    return list((await conn.execute(text(query), {"u": user_id, "b": before, "l": limit})).all())


async def ledger_sum(conn: AsyncConnection, user_id: str) -> int:
    return int(
        (
            await conn.execute(
                text("SELECT COALESCE(SUM(amount), 0) FROM ledger_entries WHERE user_id = :u"), {"u": user_id}
            )
        ).scalar_one()
    )


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
    pool: asyncpg.Pool, reservation_id: str, amount: int | None, now: datetime, threshold: int, low_event: str
) -> Any:
    """Returns (outcome, user_id, amount, charged, balance, version, crossed); see migration 0002."""
    return await pool.fetchrow(
        "SELECT * FROM credits_commit($1::uuid, $2, $3, $4, $5::jsonb)",
        reservation_id,
        amount,
        now,
        threshold,
        low_event,
    )


async def commit_batch_fast(
    conn: asyncpg.Connection,
    ids: Sequence[str],
    amounts: Sequence[int | None],
    now: datetime,
    threshold: int,
    low_events: Sequence[str],
) -> list[Any]:
    """One row per id (in lock order, not input order): (reservation_id, outcome, user_id, amount,
    charged, balance, version, crossed); see migrations 0002 and 0003."""
    return list(
        await conn.fetch(
            "SELECT * FROM credits_commit_batch($1::uuid[], $2::bigint[], $3, $4, $5::jsonb[])",
            list(ids),
            list(amounts),
            now,
            threshold,
            list(low_events),
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


async def analytics(conn: AsyncConnection) -> dict[str, Any]:
    totals = (
        await conn.execute(
            text(
                "SELECT count(*) AS users, COALESCE(SUM(credits_purchased_total), 0) AS purchased, "
                "COALESCE(SUM(credits_lifetime_used), 0) AS used, COALESCE(SUM(balance), 0) AS remaining "
                "FROM accounts"
            )
        )
    ).one()
    paying = (await conn.execute(text("SELECT count(DISTINCT user_id) FROM purchases"))).scalar_one()
    tiers = await conn.execute(text("SELECT tier, count(*) AS n FROM accounts GROUP BY tier"))
    revenue = await conn.execute(text("SELECT pack, SUM(amount_cents) AS cents FROM purchases GROUP BY pack"))
    return {
        "total_users": int(totals.users),
        "paying_users": int(paying),
        "tier_breakdown": {r.tier: int(r.n) for r in tiers},
        "revenue_by_pack_cents": {r.pack: int(r.cents) for r in revenue},
        "total_credits_purchased": int(totals.purchased),
        "total_credits_used": int(totals.used),
        "total_credits_remaining": int(totals.remaining),
    }


# ---------------------------------------------------------------- outbox


async def add_outbox(conn: AsyncConnection, event: Event) -> None:
    await conn.execute(
        text("INSERT INTO outbox (routing_key, body, request_id) VALUES (:k, :b, :r)"),
        {"k": event.routing_key, "b": orjson.dumps(event.body()).decode(), "r": current_request_id()},
    )


async def claim_outbox(conn: AsyncConnection, limit: int) -> list[Any]:
    rows = await conn.execute(
        text(
            "SELECT id, routing_key, body, request_id FROM outbox WHERE published_at IS NULL "
            "ORDER BY id LIMIT :l "
            "FOR UPDATE SKIP LOCKED"
        ),
        {"l": limit},
    )
    return list(rows)


async def mark_published(conn: AsyncConnection, ids: Sequence[int], when: datetime) -> None:
    await conn.execute(
        text("UPDATE outbox SET published_at = :w WHERE id = ANY(CAST(:ids AS bigint[]))"),
        {"w": when, "ids": list(ids)},
    )
