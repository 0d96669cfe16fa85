"""Request bodies of the credits API (docs/api.md, Credits): strict pydantic models, the check
every route makes of a user id, and the settlement batch's items answered one by one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from services.credits.ids import valid_user_id
from shared.bodies import RequestBody
from shared.errors import AppError, InvalidRequest

MAX_CREDITS = 10**12

Credits = Annotated[StrictInt, Field(gt=0, le=MAX_CREDITS)]


class Body(RequestBody):
    pass


BodyT = TypeVar("BodyT", bound=BaseModel)


class CreateUser(Body):
    user_id: StrictStr


class ReserveBody(Body):
    user_id: StrictStr
    amount: Credits
    idempotency_key: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None
    ttl_seconds: Annotated[StrictInt, Field(gt=0)] | None = None


def _printable(value: str) -> str:
    # PostgreSQL's jsonb refuses NUL, and control characters have no place in a model name.
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


Label = Annotated[StrictStr, Field(min_length=1, max_length=200), AfterValidator(_printable)]
Tokens = Annotated[StrictInt, Field(ge=0, le=10**12)]


class UsageDetails(Body):
    """What a committed request was (docs/api.md, Credits `details` of a usage entry). Unknown keys are dropped,
    so what is stored stays small; known keys are checked strictly."""

    operation: Label
    model: Label | None = None
    input_tokens: Tokens | None = None
    output_tokens: Tokens | None = None
    upstream_cost_usd: Annotated[StrictFloat, Field(ge=0, le=10**6, allow_inf_nan=False)] | None = None

    def stored(self) -> str:
        """The jsonb text kept on the usage entry: always the five keys."""
        return orjson.dumps(self.model_dump()).decode()


def stored_details(details: UsageDetails | None) -> str | None:
    return details.stored() if details is not None else None


class CommitBody(Body):
    amount: Annotated[StrictInt, Field(ge=0, le=MAX_CREDITS)] | None = None
    details: UsageDetails | None = None
    # Credits the request cost beyond its hold (its usage exceeded the estimate): taken from what the
    # balance has, the rest recorded as owed. Beyond the contract; `amount` keeps its meaning.
    overage: Annotated[StrictInt, Field(ge=0, le=MAX_CREDITS)] = 0


class SettleItem(Body):
    reservation_id: Annotated[StrictStr, Field(min_length=1, max_length=100)]
    action: Literal["commit", "release"]
    amount: Annotated[StrictInt, Field(ge=0, le=MAX_CREDITS)] | None = None
    details: UsageDetails | None = None  # commits only; a release has no usage entry
    overage: Annotated[StrictInt, Field(ge=0, le=MAX_CREDITS)] = 0


class HoldItem(Body):
    """A hold already placed in Redis with this service's reserve.lua (the proxy's fast path)."""

    reservation_id: Annotated[StrictStr, Field(min_length=1, max_length=100)]
    action: Literal["hold"]
    user_id: StrictStr
    amount: Credits
    epoch: Annotated[StrictStr, Field(max_length=30)]
    deadline_ms: Annotated[StrictInt, Field(gt=0)]
    kind: Literal["usage"] = "usage"


class ExtendItem(Body):
    """A hold whose request is still being served (a long stream): its deadline moves to `deadline_ms`."""

    reservation_id: Annotated[StrictStr, Field(min_length=1, max_length=100)]
    action: Literal["extend"]
    deadline_ms: Annotated[StrictInt, Field(gt=0)]


MAX_BATCH_ITEMS = 1000

BatchItem = SettleItem | HoldItem | ExtendItem
TaggedBatchItem = Annotated[BatchItem, Field(discriminator="action")]


class SettleBatch(Body):
    items: Annotated[list[TaggedBatchItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


class CreateKey(Body):
    name: Annotated[StrictStr, Field(max_length=200)] | None = None


class VerifyKey(Body):
    key: Annotated[StrictStr, Field(min_length=1, max_length=500)]


class Grant(Body):
    credits: Credits
    reason: Annotated[StrictStr, Field(min_length=1, max_length=500)]
    grant_id: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None


class MigrationUser(Body):
    user_id: StrictStr
    tier: StrictStr


class Migration(Body):
    users: Annotated[list[MigrationUser], Field(min_length=1, max_length=10_000)]


def checked_user(user_id: str) -> str:
    if not valid_user_id(user_id):
        raise InvalidRequest("user_id must be 1-200 characters without control characters.")
    return user_id


class UnprocessableBody(AppError):
    status_code, code = 422, "invalid_request"


def unprocessable(exc: ValidationError, where: tuple[str | int, ...] = ()) -> UnprocessableBody:
    """The 422 for a body (or, `where` it sits, a part of one) that does not validate."""
    parts = [
        f"{'.'.join(str(p) for p in (*where, *err.get('loc', ()))) or 'body'}: {err.get('msg', 'invalid')}"
        for err in exc.errors()[:5]
    ]
    return UnprocessableBody("; ".join(parts) or "Invalid request body.")


# --- the settlement batch, item by item ---


class _BatchEnvelope(BaseModel):
    """What a batch must be for its items to be answered one by one: 1..MAX_BATCH_ITEMS objects.
    Not a RequestBody: text PostgreSQL cannot store is the item's fault, refused with the item."""

    model_config = ConfigDict(extra="ignore")

    items: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]


# Items arrive decoded by the envelope: every field is Strict*, so validating them as Python objects
# accepts and refuses what validating the JSON does.
_BATCH_ITEM: TypeAdapter[BatchItem] = TypeAdapter(TaggedBatchItem)


@dataclass(slots=True, frozen=True)
class RefusedItem:
    """A batch item answered with an error of its own, without being applied."""

    reservation_id: str | None  # as sent, when it was a string
    error: AppError


@dataclass(slots=True)
class ParsedBatch:
    """A settlement batch's valid items in order, also by kind, and the refused ones by position."""

    items: list[BatchItem]
    settles: list[SettleItem]
    holds: list[HoldItem]
    extends: list[ExtendItem]
    refused: dict[int, RefusedItem] = field(default_factory=dict)


def parse_batch(raw: bytes) -> ParsedBatch:
    """The body of POST /v1/reservations/batch. Only a malformed envelope (not `{"items": [...]}` of
    1..MAX_BATCH_ITEMS objects) is refused whole (422); an item that does not validate (422), a hold
    for an invalid user id (400, as the reserve answers) or a reservation already in an earlier item
    (400) is refused on its own, so the other items, often other users' settlements, still apply.

    The whole body is validated at once first, as the call of every proxied request's settlement
    must stay cheap; items are validated one by one only when that fails."""
    try:
        items = SettleBatch.model_validate_json(raw).items
    except ValidationError as exc:
        return _screened(_items_one_by_one(raw, exc))
    ids = [item.reservation_id for item in items]
    holds = [item for item in items if isinstance(item, HoldItem)]
    if len(set(ids)) != len(ids) or not all(valid_user_id(hold.user_id) for hold in holds):
        return _screened(items)
    settles = [item for item in items if isinstance(item, SettleItem)]
    extends = [item for item in items if isinstance(item, ExtendItem)]
    return ParsedBatch(items, settles, holds, extends)


def _items_one_by_one(raw: bytes, whole: ValidationError) -> list[BatchItem | RefusedItem]:
    try:
        envelope = _BatchEnvelope.model_validate_json(raw)
    except ValidationError:
        raise unprocessable(whole) from None  # the batch itself is malformed: what the call answered
    parsed: list[BatchItem | RefusedItem] = []
    for position, raw_item in enumerate(envelope.items):
        try:
            parsed.append(_BATCH_ITEM.validate_python(raw_item))
        except ValidationError as exc:
            rid = raw_item.get("reservation_id")
            error = unprocessable(exc, ("items", position))
            parsed.append(RefusedItem(rid if isinstance(rid, str) else None, error))
    return parsed


def _screened(parsed: Sequence[BatchItem | RefusedItem]) -> ParsedBatch:
    """Refuses a reservation id's later items (the first one, valid or not, keeps it) and holds for
    invalid user ids; sorts the rest by kind."""
    batch = ParsedBatch([], [], [], [])
    seen: set[str] = set()
    for position, item in enumerate(parsed):
        rid = item.reservation_id
        if rid is not None:
            if rid in seen and not isinstance(item, RefusedItem):
                repeated = "Each reservation may appear at most once per batch; an earlier item has this one."
                item = RefusedItem(rid, InvalidRequest(repeated))
            seen.add(rid)
        if isinstance(item, HoldItem):
            try:
                checked_user(item.user_id)
            except InvalidRequest as exc:
                item = RefusedItem(rid, exc)
        if isinstance(item, RefusedItem):
            batch.refused[position] = item
            continue
        batch.items.append(item)
        if isinstance(item, SettleItem):
            batch.settles.append(item)
        elif isinstance(item, HoldItem):
            batch.holds.append(item)
        else:
            batch.extends.append(item)
    return batch
