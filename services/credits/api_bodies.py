"""Request bodies of the credits API (docs/api.md, Credits): strict pydantic models, and the check
every route makes of a user id."""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, Field, StrictFloat, StrictInt, StrictStr

from services.credits.ids import valid_user_id
from shared.bodies import RequestBody
from shared.errors import InvalidRequest

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


class SettleBatch(Body):
    items: Annotated[
        list[Annotated[SettleItem | HoldItem | ExtendItem, Field(discriminator="action")]],
        Field(min_length=1, max_length=MAX_BATCH_ITEMS),
    ]


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
