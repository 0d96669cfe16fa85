"""HTTP routes of the credits service (docs/api.md, Credits): parse, call the domain, map the result."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from services.credits.apikeys import ApiKeys
from services.credits.ledger import HoldToRecord, Ledger, ReserveResult, SettleResult, valid_user_id
from services.credits.store import Reservation
from shared.auth import admin_only, bearer_token, internal_only, token_matches
from shared.bodies import RequestBody, json_body, optional_json_body
from shared.errors import AppError, InvalidRequest, Unauthorized
from shared.responses import JsonResponse
from shared.web import TemplateRoute

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


async def ledger_of(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


async def keys_of(request: Request) -> ApiKeys:
    keys: ApiKeys = request.app.state.api_keys
    return keys


LedgerDep = Annotated[Ledger, Depends(ledger_of)]
KeysDep = Annotated[ApiKeys, Depends(keys_of)]


def checked_user(user_id: str) -> str:
    if not valid_user_id(user_id):
        raise InvalidRequest("user_id must be 1-200 characters without control characters.")
    return user_id


def reservation_body(result: ReserveResult) -> dict[str, Any]:
    r = result.reservation
    return {
        "reservation_id": r.id,
        "user_id": r.user_id,
        "amount": r.amount,
        "status": r.status,
        "expires_at": r.expires_at,
        "credits_remaining": result.available,
    }


def recorded_body(reservation: Reservation) -> dict[str, Any]:
    """A recorded hold in a batch answer (whose "status" is the item's HTTP status, 201)."""
    return {
        "reservation_id": reservation.id,
        "user_id": reservation.user_id,
        "amount": reservation.amount,
        "expires_at": reservation.expires_at,
    }


def settle_body(result: SettleResult, *, commit: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"reservation_id": result.reservation_id}
    if commit:
        body["charged"] = result.charged
        if result.overage:
            body["overage"] = result.overage
            body["owed"] = result.owed
    body["refunded"] = result.refunded
    body["credits_remaining"] = result.available
    return body


internal = APIRouter(dependencies=[Depends(internal_only())])
admin = APIRouter(prefix="/v1/admin", dependencies=[Depends(admin_only())])


@internal.post("/v1/users")
async def create_user(
    body: Annotated[CreateUser, Depends(json_body(CreateUser))], ledger: LedgerDep
) -> JsonResponse:
    account, created = await ledger.create_user(checked_user(body.user_id))
    return JsonResponse(account, status_code=201 if created else 200)


@internal.get("/v1/users/{user_id}/credits")
async def get_credits(user_id: str, ledger: LedgerDep) -> JsonResponse:
    return JsonResponse(await ledger.account(checked_user(user_id)))


@internal.get("/v1/users/{user_id}/transactions")
async def get_transactions(
    user_id: str,
    ledger: LedgerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> JsonResponse:
    return JsonResponse(await ledger.transactions(checked_user(user_id), limit, before))


@internal.get("/v1/reservations/{reservation_id}")
async def get_reservation(reservation_id: str, ledger: LedgerDep) -> JsonResponse:
    r = await ledger.get_reservation(reservation_id)
    return JsonResponse(
        {
            "reservation_id": r.id,
            "user_id": r.user_id,
            "amount": r.amount,
            "status": r.status,
            "charged": r.charged,
            "expires_at": r.expires_at,
        }
    )


@internal.post("/v1/users/{user_id}/api-keys")
async def create_api_key(
    user_id: str, keys: KeysDep, body: Annotated[CreateKey | None, Depends(optional_json_body(CreateKey))]
) -> JsonResponse:
    return JsonResponse(
        await keys.create(checked_user(user_id), body.name if body else None), status_code=201
    )


@internal.get("/v1/users/{user_id}/api-keys")
async def list_api_keys(user_id: str, keys: KeysDep) -> JsonResponse:
    return JsonResponse(await keys.list(checked_user(user_id)))


@internal.delete("/v1/users/{user_id}/api-keys/{key_id}")
async def revoke_api_key(user_id: str, key_id: str, keys: KeysDep) -> JsonResponse:
    return JsonResponse(await keys.revoke(checked_user(user_id), key_id))


@admin.post("/users/{user_id}/grants")
async def grant(
    user_id: str,
    body: Annotated[Grant, Depends(json_body(Grant))],
    ledger: LedgerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JsonResponse:
    user_id = checked_user(user_id)
    # Without a grant_id or Idempotency-Key every call is a new grant.
    grant_id = body.grant_id or idempotency_key or uuid.uuid4().hex
    applied = await ledger.grant(user_id, body.credits, body.reason, grant_id)
    account = await ledger.account(user_id)
    return JsonResponse(
        {"grant_id": grant_id, "applied": applied, "credits": body.credits, "account": account},
        status_code=201 if applied else 200,
    )


@admin.post("/migrations/subscriptions")
async def migrate(
    body: Annotated[Migration, Depends(json_body(Migration))], ledger: LedgerDep
) -> JsonResponse:
    users = [(checked_user(u.user_id), u.tier) for u in body.users]
    if len({u for u, _ in users}) != len(users):
        raise InvalidRequest("Each user may appear only once; nothing was migrated.")
    return JsonResponse({"data": await ledger.migrate_subscriptions(users)})


def _day(name: str, value: str | None) -> date | None:
    if value is None or value == "":
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO date (YYYY-MM-DD), UTC.") from None


@admin.get("/analytics")
async def analytics(
    ledger: LedgerDep,
    from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
    to: Annotated[str | None, Query(max_length=40)] = None,
) -> JsonResponse:
    first, last = _day("from", from_), _day("to", to)
    if first is not None and last is not None and first > last:
        raise InvalidRequest("from must not be after to.")
    return JsonResponse(await ledger.analytics(first, last))


# ---------------------------------------------------------------- hot path
# Reserve, commit, release and key verification are called on every metered request. They are plain
# Starlette routes: the same checks (internal token, strict pydantic bodies) without FastAPI's
# per-request dependency solving, which profiling showed to cost more than the work itself.


class UnprocessableBody(AppError):
    status_code, code = 422, "invalid_request"


def _require_internal(request: Request) -> None:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("This endpoint needs Authorization: Bearer <internal token>.")
    if not token_matches(token, request.app.state.settings.internal_token):
        raise Unauthorized("Invalid internal token.")


async def _parse(request: Request, model: type[BodyT], *, optional: bool = False) -> BodyT | None:
    raw = await request.body()
    if optional and not raw.strip():
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: {err.get('msg', 'invalid')}"
            for err in exc.errors()[:5]
        ]
        raise UnprocessableBody("; ".join(parts) or "Invalid request body.") from None


async def reserve(request: Request) -> JsonResponse:
    _require_internal(request)
    body = await _parse(request, ReserveBody)
    assert body is not None
    ledger: Ledger = request.app.state.ledger
    ttl = body.ttl_seconds
    if ttl is not None and ttl > ledger.settings.max_reservation_ttl_seconds:
        raise InvalidRequest(f"ttl_seconds may be at most {ledger.settings.max_reservation_ttl_seconds}.")
    result = await ledger.reserve(checked_user(body.user_id), body.amount, body.idempotency_key, ttl)
    assert result is not None
    return JsonResponse(reservation_body(result), status_code=201)


async def commit(request: Request) -> JsonResponse:
    _require_internal(request)
    body = await _parse(request, CommitBody, optional=True)
    ledger: Ledger = request.app.state.ledger
    result = await ledger.commit(
        request.path_params["reservation_id"],
        body.amount if body else None,
        stored_details(body.details) if body else None,
        body.overage if body else 0,
    )
    return JsonResponse(settle_body(result, commit=True))


async def release(request: Request) -> JsonResponse:
    _require_internal(request)
    ledger: Ledger = request.app.state.ledger
    return JsonResponse(
        settle_body(await ledger.release(request.path_params["reservation_id"]), commit=False)
    )


async def settle_batch(request: Request) -> JsonResponse:
    """Many commits/releases, and records of holds placed in Redis, in one call (the proxy settles
    its requests in batches).

    Each commit/release runs through the same idempotent commit/release as the single endpoints (the
    commit writer groups them into shared PostgreSQL transactions; Redis is synced in one round trip);
    each "hold" item is recorded through the reserve's group commit (`Ledger.record_holds`). Each
    result carries the status and body the single endpoint would have answered (201 and the
    reservation for a recorded hold); the call itself is 200 unless the whole body is invalid. Items
    for the same reservation must not appear twice in one batch.
    """
    _require_internal(request)
    body = await _parse(request, SettleBatch)
    assert body is not None
    ids = [item.reservation_id for item in body.items]
    if len(set(ids)) != len(ids):
        raise InvalidRequest("Each reservation may appear at most once per batch.")
    ledger: Ledger = request.app.state.ledger
    settles = [item for item in body.items if isinstance(item, SettleItem)]
    holds = [item for item in body.items if isinstance(item, HoldItem)]
    extends = [item for item in body.items if isinstance(item, ExtendItem)]
    for hold in holds:
        checked_user(hold.user_id)
    # Records, settlements and extensions run side by side; their answers go back in the items' order.
    settled, recorded, extended = await asyncio.gather(
        ledger.settle_many(
            [(i.reservation_id, i.action, i.amount) for i in settles],
            [stored_details(i.details) if i.action == "commit" else None for i in settles],
            [i.overage if i.action == "commit" else 0 for i in settles],
        ),
        ledger.record_holds(
            [
                HoldToRecord(i.reservation_id, i.user_id, i.amount, i.epoch, i.deadline_ms, i.kind)
                for i in holds
            ]
        ),
        ledger.extend_holds([(i.reservation_id, i.deadline_ms) for i in extends]),
    )
    settled_in_order, recorded_in_order, extended_in_order = iter(settled), iter(recorded), iter(extended)
    results: list[dict[str, Any]] = []
    for item in body.items:
        if isinstance(item, ExtendItem):
            outcome: Any = next(extended_in_order)
            answer = None if isinstance(outcome, AppError) else {"status": 200, **outcome}
        elif isinstance(item, HoldItem):
            outcome = next(recorded_in_order)
            answer = None if isinstance(outcome, AppError) else {"status": 201, **recorded_body(outcome)}
        else:
            outcome = next(settled_in_order)
            commit = item.action == "commit"
            answer = (
                None
                if isinstance(outcome, AppError)
                else {"status": 200, **settle_body(outcome, commit=commit)}
            )
        if answer is None:
            answer = {"reservation_id": item.reservation_id, "status": outcome.status_code, **outcome.body()}
        results.append(answer)
    return JsonResponse({"results": results})


async def verify_api_key(request: Request) -> JsonResponse:
    _require_internal(request)
    body = await _parse(request, VerifyKey)
    assert body is not None
    keys: ApiKeys = request.app.state.api_keys
    return JsonResponse(await keys.verify(body.key))


hot_routes = [
    TemplateRoute("/v1/reservations", reserve, methods=["POST"]),
    TemplateRoute("/v1/reservations/batch", settle_batch, methods=["POST"]),
    TemplateRoute("/v1/reservations/{reservation_id}/commit", commit, methods=["POST"]),
    TemplateRoute("/v1/reservations/{reservation_id}/release", release, methods=["POST"]),
    TemplateRoute("/v1/api-keys/verify", verify_api_key, methods=["POST"]),
]
