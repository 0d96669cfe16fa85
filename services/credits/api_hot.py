"""The credits routes called on every metered request: reserve, commit, release, the settlement batch
and key verification (docs/api.md, Credits). They are plain Starlette routes: the same checks
(internal token, strict pydantic bodies) without FastAPI's per-request dependency solving, which
profiling showed to cost more than the work itself."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from services.credits.api_bodies import (
    BodyT,
    CommitBody,
    ExtendItem,
    HoldItem,
    RefusedItem,
    ReserveBody,
    VerifyKey,
    checked_user,
    parse_batch,
    stored_details,
    unprocessable,
)
from services.credits.api_responses import (
    extended_body,
    key_owner_body,
    recorded_body,
    reservation_body,
    settle_body,
)
from services.credits.apikeys import ApiKeys
from services.credits.reservations import HoldToRecord
from services.credits.runtime import Runtime
from shared.auth import bearer_token, token_matches
from shared.errors import AppError, InvalidRequest, Unauthorized
from shared.responses import JsonResponse
from shared.web import TemplateRoute


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
        raise unprocessable(exc) from None


async def reserve(request: Request) -> JsonResponse:
    _require_internal(request)
    body = await _parse(request, ReserveBody)
    assert body is not None
    runtime: Runtime = request.app.state.runtime
    ttl = body.ttl_seconds
    if ttl is not None and ttl > runtime.settings.max_reservation_ttl_seconds:
        raise InvalidRequest(f"ttl_seconds may be at most {runtime.settings.max_reservation_ttl_seconds}.")
    result = await runtime.reservations.reserve(
        checked_user(body.user_id), body.amount, body.idempotency_key, ttl
    )
    assert result is not None
    return JsonResponse(reservation_body(result), status_code=201)


async def commit(request: Request) -> JsonResponse:
    _require_internal(request)
    body = await _parse(request, CommitBody, optional=True)
    runtime: Runtime = request.app.state.runtime
    result = await runtime.settlements.commit(
        request.path_params["reservation_id"],
        body.amount if body else None,
        stored_details(body.details) if body else None,
        body.overage if body else 0,
    )
    return JsonResponse(settle_body(result, commit=True))


async def release(request: Request) -> JsonResponse:
    _require_internal(request)
    runtime: Runtime = request.app.state.runtime
    return JsonResponse(
        settle_body(await runtime.settlements.release(request.path_params["reservation_id"]), commit=False)
    )


async def settle_batch(request: Request) -> JsonResponse:
    """Many commits/releases, and records of holds placed in Redis, in one call (the proxy settles
    its requests in batches).

    Each commit/release runs through the same idempotent commit/release as the single endpoints (the
    commit writer groups them into shared PostgreSQL transactions; Redis is synced in one round trip);
    each "hold" item is recorded through the reserve's group commit (`Reservations.record_holds`). Each
    result carries the status and body the single endpoint would have answered (201 and the
    reservation for a recorded hold). An item that is malformed, or whose reservation an earlier
    item has, is answered with its own error and not applied (`parse_batch`); the call itself is 200
    unless the envelope is invalid.
    """
    _require_internal(request)
    batch = parse_batch(await request.body())
    runtime: Runtime = request.app.state.runtime
    settles, holds, extends = batch.settles, batch.holds, batch.extends
    # Records, settlements and extensions run side by side; their answers go back in the items' order.
    settled, recorded, extended = await asyncio.gather(
        runtime.settlements.settle_many(
            [(i.reservation_id, i.action, i.amount) for i in settles],
            [stored_details(i.details) if i.action == "commit" else None for i in settles],
            [i.overage if i.action == "commit" else 0 for i in settles],
        ),
        runtime.reservations.record_holds(
            [
                HoldToRecord(i.reservation_id, i.user_id, i.amount, i.epoch, i.deadline_ms, i.kind)
                for i in holds
            ]
        ),
        runtime.reservations.extend_holds([(i.reservation_id, i.deadline_ms) for i in extends]),
    )
    settled_in_order, recorded_in_order, extended_in_order = iter(settled), iter(recorded), iter(extended)
    results: list[dict[str, Any]] = []
    for item in batch.items:
        if isinstance(item, ExtendItem):
            outcome: Any = next(extended_in_order)
            answer = None if isinstance(outcome, AppError) else {"status": 200, **extended_body(outcome)}
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
            answer = _refusal(item.reservation_id, outcome)
        results.append(answer)
    if batch.refused:
        results = _with_refusals(results, batch.refused)
    return JsonResponse({"results": results})


def _refusal(reservation_id: str | None, error: AppError) -> dict[str, Any]:
    """A batch item's error answer: its reservation id, the single endpoint's status and envelope."""
    return {"reservation_id": reservation_id, "status": error.status_code, **error.body()}


def _with_refusals(applied: list[dict[str, Any]], refused: dict[int, RefusedItem]) -> list[dict[str, Any]]:
    """The answers of the applied items with those of the refused ones put back at their positions."""
    answers = iter(applied)
    return [
        _refusal(refused[p].reservation_id, refused[p].error) if p in refused else next(answers)
        for p in range(len(applied) + len(refused))
    ]


async def verify_api_key(request: Request) -> JsonResponse:
    _require_internal(request)
    body = await _parse(request, VerifyKey)
    assert body is not None
    keys: ApiKeys = request.app.state.runtime.api_keys
    return JsonResponse(key_owner_body(await keys.verify(body.key)))


hot_routes = [
    TemplateRoute("/v1/reservations", reserve, methods=["POST"]),
    TemplateRoute("/v1/reservations/batch", settle_batch, methods=["POST"]),
    TemplateRoute("/v1/reservations/{reservation_id}/commit", commit, methods=["POST"]),
    TemplateRoute("/v1/reservations/{reservation_id}/release", release, methods=["POST"]),
    TemplateRoute("/v1/api-keys/verify", verify_api_key, methods=["POST"]),
]
