"""HTTP routes of the credits service (docs/api.md, Credits) outside the hot path: accounts, their
ledger, API keys and the admin endpoints. Parse, call the domain, map the result (api_responses.py);
the per-request routes are in api_hot.py."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request

from services.credits.accounts import Accounts
from services.credits.analytics import Analytics
from services.credits.api_bodies import CreateKey, CreateUser, Grant, Migration, checked_user
from services.credits.api_responses import (
    account_body,
    analytics_body,
    api_key_body,
    migrated_body,
    reservation_view,
    transactions_body,
)
from services.credits.apikeys import ApiKeys
from services.credits.reservations import Reservations
from services.credits.runtime import Runtime
from shared.auth import admin_only, internal_only
from shared.bodies import json_body, optional_json_body
from shared.errors import InvalidRequest
from shared.responses import JsonResponse


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def accounts_of(request: Request) -> Accounts:
    return _runtime(request).accounts


async def reservations_of(request: Request) -> Reservations:
    return _runtime(request).reservations


async def analytics_of(request: Request) -> Analytics:
    return _runtime(request).analytics


async def keys_of(request: Request) -> ApiKeys:
    return _runtime(request).api_keys


AccountsDep = Annotated[Accounts, Depends(accounts_of)]
ReservationsDep = Annotated[Reservations, Depends(reservations_of)]
AnalyticsDep = Annotated[Analytics, Depends(analytics_of)]
KeysDep = Annotated[ApiKeys, Depends(keys_of)]

internal = APIRouter(dependencies=[Depends(internal_only())])
admin = APIRouter(prefix="/v1/admin", dependencies=[Depends(admin_only())])


@internal.post("/v1/users")
async def create_user(
    body: Annotated[CreateUser, Depends(json_body(CreateUser))], accounts: AccountsDep
) -> JsonResponse:
    account, created = await accounts.create_user(checked_user(body.user_id))
    return JsonResponse(account_body(account), status_code=201 if created else 200)


@internal.get("/v1/users/{user_id}/credits")
async def get_credits(user_id: str, accounts: AccountsDep) -> JsonResponse:
    return JsonResponse(account_body(await accounts.account(checked_user(user_id))))


@internal.get("/v1/users/{user_id}/transactions")
async def get_transactions(
    user_id: str,
    accounts: AccountsDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> JsonResponse:
    return JsonResponse(transactions_body(await accounts.transactions(checked_user(user_id), limit, before)))


@internal.get("/v1/reservations/{reservation_id}")
async def get_reservation(reservation_id: str, reservations: ReservationsDep) -> JsonResponse:
    return JsonResponse(reservation_view(await reservations.get_reservation(reservation_id)))


@internal.post("/v1/users/{user_id}/api-keys")
async def create_api_key(
    user_id: str, keys: KeysDep, body: Annotated[CreateKey | None, Depends(optional_json_body(CreateKey))]
) -> JsonResponse:
    created, key = await keys.create(checked_user(user_id), body.name if body else None)
    return JsonResponse({**api_key_body(created), "key": key}, status_code=201)


@internal.get("/v1/users/{user_id}/api-keys")
async def list_api_keys(user_id: str, keys: KeysDep) -> JsonResponse:
    return JsonResponse({"data": [api_key_body(k) for k in await keys.list(checked_user(user_id))]})


@internal.delete("/v1/users/{user_id}/api-keys/{key_id}")
async def revoke_api_key(user_id: str, key_id: str, keys: KeysDep) -> JsonResponse:
    return JsonResponse(api_key_body(await keys.revoke(checked_user(user_id), key_id)))


@admin.post("/users/{user_id}/grants")
async def grant(
    user_id: str,
    body: Annotated[Grant, Depends(json_body(Grant))],
    accounts: AccountsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JsonResponse:
    user_id = checked_user(user_id)
    # Without a grant_id or Idempotency-Key every call is a new grant.
    grant_id = body.grant_id or idempotency_key or uuid.uuid4().hex
    applied = await accounts.grant(user_id, body.credits, body.reason, grant_id)
    account = account_body(await accounts.account(user_id))
    return JsonResponse(
        {"grant_id": grant_id, "applied": applied, "credits": body.credits, "account": account},
        status_code=201 if applied else 200,
    )


@admin.post("/migrations/subscriptions")
async def migrate(
    body: Annotated[Migration, Depends(json_body(Migration))], accounts: AccountsDep
) -> JsonResponse:
    users = [(checked_user(u.user_id), u.tier) for u in body.users]
    if len({u for u, _ in users}) != len(users):
        raise InvalidRequest("Each user may appear only once; nothing was migrated.")
    return JsonResponse({"data": [migrated_body(m) for m in await accounts.migrate_subscriptions(users)]})


def _day(name: str, value: str | None) -> date | None:
    if value is None or value == "":
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be an ISO date (YYYY-MM-DD), UTC.") from None


@admin.get("/analytics")
async def analytics(
    figures: AnalyticsDep,
    from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
    to: Annotated[str | None, Query(max_length=40)] = None,
) -> JsonResponse:
    first, last = _day("from", from_), _day("to", to)
    if first is not None and last is not None and first > last:
        raise InvalidRequest("from must not be after to.")
    return JsonResponse(analytics_body(await figures.figures(first, last), first, last))
