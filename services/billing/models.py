"""Billing's data: a purchase row and its statuses. The rules that move a purchase between statuses
live in `purchases.py`; `store.py` reads and writes these rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    FAILED = "failed"
    EXPIRED = "expired"
    REFUNDED = "refunded"
    PARTIALLY_REFUNDED = "partially_refunded"


CREDITED = frozenset({Status.PAID, Status.REFUNDED, Status.PARTIALLY_REFUNDED})


@dataclass(frozen=True)
class Purchase:
    purchase_id: str
    user_id: str
    pack: str
    credits: int
    unlocks_api: bool
    amount_cents: int
    currency: str
    status: str
    stripe_checkout_session_id: str | None = None
    stripe_payment_intent_id: str | None = None
    success_url: str | None = None
    cancel_url: str | None = None
    amount_refunded_cents: int = 0
    credits_refunded: int = 0
    review_reason: str | None = None
    created_at: datetime | None = None
    paid_at: datetime | None = None

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["created_at"] = self.created_at or datetime.now(UTC)
        return row
