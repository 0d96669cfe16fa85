"""The messages of docs/messages.md as pydantic models. Event names are past tense: they report facts."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


def _now() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    routing_key: ClassVar[str]

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: datetime = Field(default_factory=_now)

    def body(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class PackPurchased(Event):
    routing_key: ClassVar[str] = "billing.pack.purchased"
    event_type: Literal["billing.pack.purchased"] = "billing.pack.purchased"
    purchase_id: str = Field(min_length=1, max_length=200)
    user_id: str = Field(min_length=1, max_length=200)
    pack: str = Field(min_length=1, max_length=100)
    credits: int = Field(gt=0, le=10**12)
    unlocks_api: bool
    amount_cents: int = Field(ge=0)
    currency: str = Field(min_length=3, max_length=3)
    stripe_checkout_session_id: str | None = None


class PackRefunded(Event):
    routing_key: ClassVar[str] = "billing.pack.refunded"
    event_type: Literal["billing.pack.refunded"] = "billing.pack.refunded"
    purchase_id: str = Field(min_length=1, max_length=200)
    user_id: str = Field(min_length=1, max_length=200)
    pack: str = Field(min_length=1, max_length=100)
    credits: int = Field(ge=0, le=10**12)
    amount_cents: int = Field(ge=0)
    currency: str = Field(min_length=3, max_length=3)


class PurchaseApplied(Event):
    routing_key: ClassVar[str] = "credits.purchase.applied"
    event_type: Literal["credits.purchase.applied"] = "credits.purchase.applied"
    purchase_id: str
    user_id: str
    credits: int
    credits_remaining: int


class BalanceLow(Event):
    routing_key: ClassVar[str] = "credits.balance.low"
    event_type: Literal["credits.balance.low"] = "credits.balance.low"
    user_id: str
    credits_remaining: int
    threshold: int


class ApiAccessUnlocked(Event):
    routing_key: ClassVar[str] = "credits.api_access.unlocked"
    event_type: Literal["credits.api_access.unlocked"] = "credits.api_access.unlocked"
    user_id: str
    purchase_id: str | None = None


class JobError(BaseModel):
    code: str
    message: str


class AiJobCompleted(Event):
    routing_key: ClassVar[str] = "ai.job.completed"
    event_type: Literal["ai.job.completed"] = "ai.job.completed"
    job_id: str
    user_id: str
    credits_charged: int
    response: dict[str, Any]


class AiJobFailed(Event):
    routing_key: ClassVar[str] = "ai.job.failed"
    event_type: Literal["ai.job.failed"] = "ai.job.failed"
    job_id: str
    user_id: str
    credits_charged: int
    error: JobError


class AiJobRequest(BaseModel):
    """A command, not an event: a message on the `ai.requests` queue (docs/messages.md, AI jobs)."""

    model_config = ConfigDict(extra="ignore")
    job_id: str = Field(min_length=1, max_length=200)
    user_id: str = Field(min_length=1, max_length=200)
    operation: Literal["chat.completions", "embeddings", "images.generations"]
    request: dict[str, Any]


EVENT_TYPES: dict[str, type[Event]] = {
    cls.routing_key: cls
    for cls in (
        PackPurchased,
        PackRefunded,
        PurchaseApplied,
        BalanceLow,
        ApiAccessUnlocked,
        AiJobCompleted,
        AiJobFailed,
    )
}
