"""SQL of `accounts`: the cached balance and the purchase facts beside it, locked as stores/__init__.py says."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

ACCOUNT_COLUMNS = (
    "user_id, balance, credits_purchased_total, credits_lifetime_used, credits_owed, api_access_unlocked, "
    "tier, tier_credits, low_balance_notified, last_purchase_date, last_purchase_amount, version, created_at"
)


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


async def balances_of(conn: AsyncConnection, user_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
    rows = await conn.execute(
        text("SELECT user_id, balance, version FROM accounts WHERE user_id = ANY(CAST(:u AS text[]))"),
        {"u": list(user_ids)},
    )
    return {r.user_id: (int(r.balance), int(r.version)) for r in rows}


async def known_users(pool: asyncpg.Pool, user_ids: Sequence[str]) -> set[str]:
    rows = await pool.fetch("SELECT user_id FROM accounts WHERE user_id = ANY($1::text[])", list(user_ids))
    return {str(r["user_id"]) for r in rows}
