"""SQL of `overage_charges` (migration 0008): the record of each hold's overage charge, which keeps it
to once however often its commit is delivered."""

from __future__ import annotations

from datetime import datetime

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


async def record_overage(
    conn: AsyncConnection,
    reservation_id: str,
    user_id: str,
    credits: int,
    taken: int,
    owed: int,
    now: datetime,
) -> bool:
    """Records the hold's overage charge in the caller's transaction, which charges it. False: the
    hold's overage was charged already (by its first delivery, or by a concurrent one that committed
    first), so nothing is to be charged."""
    row = (
        await conn.execute(
            text(
                "INSERT INTO overage_charges (reservation_id, user_id, credits, taken, owed, created_at) "
                "VALUES (CAST(:r AS uuid), :u, :c, :t, :o, :now) "
                "ON CONFLICT (reservation_id) DO NOTHING RETURNING 1"
            ),
            {"r": reservation_id, "u": user_id, "c": credits, "t": taken, "o": owed, "now": now},
        )
    ).first()
    return row is not None


async def overage_charged(pool: asyncpg.Pool, reservation_id: str) -> bool:
    """Whether the hold's overage was charged (one primary-key lookup)."""
    found = await pool.fetchval(
        "SELECT 1 FROM overage_charges WHERE reservation_id = $1::uuid", reservation_id
    )
    return found is not None
