"""HTTP routes of the credits service (CONTRACT §4): parse, call the domain, map the result."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from services.credits.apikeys import ApiKeys
from services.credits.ledger import Ledger, ReserveResult, SettleResult, valid_user_id
from shared.auth import admin_only, internal_only
from shared.errors import InvalidRequest
from shared.responses import JsonResponse

MAX_CREDITS = 10**12

Credits = Annotated[StrictInt, Field(gt=0, le=MAX_CREDITS)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CreateUser(Body):
    user_id: StrictStr


class ReserveBody(Body):
    user_id: StrictStr
    amount: Credits
    idempotency_key: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None
    ttl_seconds: Annotated[StrictInt, Field(gt=0)] | None = None


class CommitBody(Body):
    amount: Annotated[StrictInt, Field(ge=0, le=MAX_CREDITS)] | None = None


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


def ledger_of(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


def keys_of(request: Request) -> ApiKeys:
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


def settle_body(result: SettleResult, *, commit: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"reservation_id": result.reservation_id}
    if commit:
        body["charged"] = result.charged
    body["refunded"] = result.refunded
    body["credits_remaining"] = result.available
    return body


internal = APIRouter(dependencies=[Depends(internal_only())])
admin = APIRouter(prefix="/v1/admin", dependencies=[Depends(admin_only())])


@internal.post("/v1/users")
async def create_user(body: CreateUser, ledger: LedgerDep) -> JsonResponse:
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


@internal.post("/v1/reservations")
async def reserve(body: ReserveBody, ledger: LedgerDep) -> JsonResponse:
    ttl = body.ttl_seconds
    if ttl is not None and ttl > ledger.settings.max_reservation_ttl_seconds:
        raise InvalidRequest(f"ttl_seconds may be at most {ledger.settings.max_reservation_ttl_seconds}.")
    result = await ledger.reserve(checked_user(body.user_id), body.amount, body.idempotency_key, ttl)
    assert result is not None
    return JsonResponse(reservation_body(result), status_code=201)


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


@internal.post("/v1/reservations/{reservation_id}/commit")
async def commit(reservation_id: str, ledger: LedgerDep, body: CommitBody | None = None) -> JsonResponse:
    result = await ledger.commit(reservation_id, body.amount if body else None)
    return JsonResponse(settle_body(result, commit=True))


@internal.post("/v1/reservations/{reservation_id}/release")
async def release(reservation_id: str, ledger: LedgerDep) -> JsonResponse:
    return JsonResponse(settle_body(await ledger.release(reservation_id), commit=False))


@internal.post("/v1/users/{user_id}/api-keys")
async def create_api_key(user_id: str, keys: KeysDep, body: CreateKey | None = None) -> JsonResponse:
    return JsonResponse(
        await keys.create(checked_user(user_id), body.name if body else None), status_code=201
    )


@internal.get("/v1/users/{user_id}/api-keys")
async def list_api_keys(user_id: str, keys: KeysDep) -> JsonResponse:
    return JsonResponse(await keys.list(checked_user(user_id)))


@internal.delete("/v1/users/{user_id}/api-keys/{key_id}")
async def revoke_api_key(user_id: str, key_id: str, keys: KeysDep) -> JsonResponse:
    return JsonResponse(await keys.revoke(checked_user(user_id), key_id))


@internal.post("/v1/api-keys/verify")
async def verify_api_key(body: VerifyKey, keys: KeysDep) -> JsonResponse:
    return JsonResponse(await keys.verify(body.key))


@admin.post("/users/{user_id}/grants")
async def grant(
    user_id: str,
    body: Grant,
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
async def migrate(body: Migration, ledger: LedgerDep) -> JsonResponse:
    users = [(checked_user(u.user_id), u.tier) for u in body.users]
    if len({u for u, _ in users}) != len(users):
        raise InvalidRequest("Each user may appear only once; nothing was migrated.")
    return JsonResponse({"data": await ledger.migrate_subscriptions(users)})


@admin.get("/analytics")
async def analytics(ledger: LedgerDep) -> JsonResponse:
    return JsonResponse(await ledger.analytics())
