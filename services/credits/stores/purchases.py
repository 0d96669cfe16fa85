"""SQL of `purchases` and `purchase_refunds`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


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
