"""SQL of `ledger_entries`, the append-only ledger, and of the balance change written with each entry."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


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


async def transactions(conn: AsyncConnection, user_id: str, limit: int, before: int | None) -> list[Any]:
    query = (
        "SELECT id, type, amount, balance_after, reference, details, created_at FROM ledger_entries"
        " WHERE user_id = :u" + (" AND id < :b" if before is not None else "") + " ORDER BY id DESC LIMIT :l"
    )
    return list((await conn.execute(text(query), {"u": user_id, "b": before, "l": limit})).all())
