"""All of billing's SQL. Every function runs on the caller's connection, inside the caller's transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.billing.models import Purchase
from shared import outbox
from shared.events import Event

_COLUMNS = (
    "purchase_id, user_id, pack, credits, unlocks_api, amount_cents, currency, status, "
    "stripe_checkout_session_id, stripe_payment_intent_id, success_url, cancel_url, "
    "amount_refunded_cents, credits_refunded, review_reason, created_at, paid_at"
)
_UPDATABLE = frozenset(
    {
        "status",
        "stripe_checkout_session_id",
        "stripe_payment_intent_id",
        "amount_refunded_cents",
        "credits_refunded",
        "review_reason",
        "paid_at",
    }
)


def _purchase(row: Any) -> Purchase:
    return Purchase(**row._mapping)


class BillingStore:
    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    # -- purchases ---------------------------------------------------------------------------------

    async def insert_purchase(self, purchase: Purchase, *, if_absent: bool = False) -> bool:
        result = await self.conn.execute(
            text(
                f"INSERT INTO purchases ({_COLUMNS}) VALUES (:purchase_id, :user_id, :pack, :credits, "
                ":unlocks_api, :amount_cents, :currency, :status, :stripe_checkout_session_id, "
                ":stripe_payment_intent_id, :success_url, :cancel_url, :amount_refunded_cents, "
                ":credits_refunded, :review_reason, :created_at, :paid_at)"
                + (" ON CONFLICT DO NOTHING" if if_absent else "")
                + " RETURNING purchase_id"
            ),
            purchase.as_row(),
        )
        return result.first() is not None

    async def _one(self, where: str, params: dict[str, Any], *, lock: bool) -> Purchase | None:
        row = (
            await self.conn.execute(
                text(f"SELECT {_COLUMNS} FROM purchases WHERE {where}" + (" FOR UPDATE" if lock else "")),
                params,
            )
        ).first()
        return _purchase(row) if row is not None else None

    async def purchase(self, purchase_id: str, *, lock: bool = False) -> Purchase | None:
        return await self._one("purchase_id = :id", {"id": purchase_id}, lock=lock)

    async def purchase_by_session(self, session_id: str, *, lock: bool = False) -> Purchase | None:
        return await self._one("stripe_checkout_session_id = :id", {"id": session_id}, lock=lock)

    async def purchase_by_payment_intent(
        self, payment_intent_id: str, *, lock: bool = False
    ) -> Purchase | None:
        # Oldest first: one PaymentIntent belongs to one purchase, LIMIT only guards against bad data.
        return await self._one(
            "stripe_payment_intent_id = :id ORDER BY created_at LIMIT 1", {"id": payment_intent_id}, lock=lock
        )

    async def update_purchase(self, purchase_id: str, **fields: Any) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        if not fields:
            return
        assignments = ", ".join(f"{name} = :{name}" for name in fields)
        await self.conn.execute(
            text(f"UPDATE purchases SET {assignments}, updated_at = now() WHERE purchase_id = :purchase_id"),
            {**fields, "purchase_id": purchase_id},
        )

    async def purchases_of(self, user_id: str, limit: int) -> list[Purchase]:
        rows = await self.conn.execute(
            text(
                f"SELECT {_COLUMNS} FROM purchases WHERE user_id = :user_id "
                "ORDER BY created_at DESC, purchase_id DESC LIMIT :limit"
            ),
            {"user_id": user_id, "limit": limit},
        )
        return [_purchase(row) for row in rows]

    # -- webhook inbox -----------------------------------------------------------------------------

    async def claim_stripe_event(
        self, event_id: str, event_type: str, stripe_created: datetime | None, payload: dict[str, Any]
    ) -> bool:
        """Records the event; False if it was recorded before (then it must not be processed again).

        A concurrent delivery of the same id waits here on the unique index until the first
        transaction ends, then sees the row: duplicates never run side by side.
        """
        result = await self.conn.execute(
            text(
                "INSERT INTO stripe_events (event_id, type, outcome, stripe_created, payload) "
                "VALUES (:event_id, :type, 'received', :created, CAST(:payload AS JSONB)) "
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            ),
            {
                "event_id": event_id,
                "type": event_type,
                "created": stripe_created,
                "payload": orjson.dumps(payload).decode(),
            },
        )
        return result.first() is not None

    async def record_event_outcome(self, event_id: str, outcome: str, purchase_id: str | None) -> None:
        await self.conn.execute(
            text("UPDATE stripe_events SET outcome = :outcome, purchase_id = :pid WHERE event_id = :id"),
            {"outcome": outcome, "pid": purchase_id, "id": event_id},
        )

    # -- outbox ------------------------------------------------------------------------------------

    async def enqueue(self, event: Event) -> bool:
        return await outbox.enqueue(self.conn, event, table="outbox")
