"""Billing's HTTP routes (docs/api.md, Billing): parse, call the domain, map the result."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import Field, field_validator

from services.billing.catalog import Pack
from services.billing.models import Purchase
from services.billing.runtime import BillingRuntime
from services.billing.store import BillingStore
from services.billing.stripe_gateway import InvalidSignature, sign_webhook
from services.billing.testmode import checkout_page, checkout_session_object, event_envelope
from shared.auth import internal_only
from shared.bodies import RequestBody, json_body
from shared.errors import InvalidRequest, NotFound
from shared.responses import JsonResponse

router = APIRouter()
Internal = Depends(internal_only())


def runtime(request: Request) -> BillingRuntime:
    rt: BillingRuntime = request.app.state.runtime
    return rt


Runtime = Annotated[BillingRuntime, Depends(runtime)]


class CheckoutBody(RequestBody):
    user_id: str = Field(min_length=1, max_length=200)
    pack: str = Field(min_length=1, max_length=100)
    success_url: str | None = Field(default=None, max_length=2000)
    cancel_url: str | None = Field(default=None, max_length=2000)

    @field_validator("user_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        # The same rule the credits service applies to the user id it receives in our message.
        if not value.isprintable():
            raise ValueError("must not contain control or other non-printable characters")
        return value

    @field_validator("success_url", "cancel_url")
    @classmethod
    def _absolute_http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an absolute http(s) URL")
        return value


# Parsed after the route's token check (shared.bodies): a caller without a token gets 401, not 422.
checkout_body = json_body(CheckoutBody)


def pack_json(pack: Pack) -> dict[str, Any]:
    body = pack.model_dump()
    # A JSON number (2.5, 24.975), not a string; four decimals are plenty for display.
    body["price_per_credit_cents"] = float(pack.price_per_credit_cents.normalize())
    return body


# Purchase fields of docs/api.md, Billing (plus a few extra, which the contract allows), in this order.
_PURCHASE_FIELDS = (
    "purchase_id pack credits amount_cents currency status created_at unlocks_api paid_at credits_refunded "
    "amount_refunded_cents stripe_checkout_session_id"
).split()


def purchase_json(purchase: Purchase) -> dict[str, Any]:
    return {name: getattr(purchase, name) for name in _PURCHASE_FIELDS}


@router.get("/v1/packs")
async def list_packs(rt: Runtime) -> dict[str, Any]:
    return {"data": [pack_json(pack) for pack in rt.catalog.by_price()]}


@router.post("/v1/checkout/sessions", status_code=201, dependencies=[Internal])
async def create_checkout_session(
    body: Annotated[CheckoutBody, Depends(checkout_body)], rt: Runtime
) -> JsonResponse:
    purchase, session = await rt.checkout.start(body.user_id, body.pack, body.success_url, body.cancel_url)
    return JsonResponse(
        {"session_id": session.id, "url": session.url, "purchase_id": purchase.purchase_id}, status_code=201
    )


@router.post("/v1/webhooks/stripe")
async def stripe_webhook(request: Request, rt: Runtime) -> dict[str, Any]:
    # The signature covers the exact bytes Stripe sent, so the raw body is verified, never a re-encoding.
    payload = await request.body()
    try:
        outcome = await rt.webhooks.receive(payload, request.headers.get("stripe-signature"))
    except InvalidSignature as exc:
        raise InvalidRequest(f"Invalid Stripe webhook: {exc}.") from None
    return {"received": True, "outcome": outcome.result}


@router.get("/v1/users/{user_id}/purchases", dependencies=[Internal])
async def list_purchases(
    user_id: str, rt: Runtime, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> dict[str, Any]:
    async with rt.engine.connect() as conn:
        purchases = await BillingStore(conn).purchases_of(user_id, limit)
    return {"data": [purchase_json(p) for p in purchases]}


# -- local test mode (docs/api.md, Billing) ---------------------------------------------------------


async def _test_purchase(rt: BillingRuntime, session_id: str) -> Any:
    if not rt.settings.test_mode:
        raise NotFound("The test checkout exists only in local test mode (no STRIPE_API_KEY).")
    async with rt.engine.connect() as conn:
        purchase = await BillingStore(conn).purchase_by_session(session_id)
    if purchase is None:
        raise NotFound("No such test checkout session.")
    return purchase


@router.get("/test-checkout/{session_id}", include_in_schema=False)
async def test_checkout_page(session_id: str, rt: Runtime) -> HTMLResponse:
    purchase = await _test_purchase(rt, session_id)
    pack = rt.catalog.get(purchase.pack)
    return HTMLResponse(checkout_page(purchase, pack.name if pack else purchase.pack))


async def _send_signed(rt: BillingRuntime, event: dict[str, Any]) -> None:
    payload = orjson.dumps(event)
    await rt.webhooks.receive(payload, sign_webhook(payload, rt.settings.webhook_secret))


@router.post("/test-checkout/{session_id}/pay", include_in_schema=False)
async def test_checkout_pay(session_id: str, rt: Runtime) -> RedirectResponse:
    purchase = await _test_purchase(rt, session_id)
    if purchase.status == "pending":
        session = checkout_session_object(purchase, paid=True)
        await _send_signed(rt, event_envelope("checkout.session.completed", session))
    return RedirectResponse(purchase.success_url or rt.settings.success_url(), status_code=303)


@router.post("/test-checkout/{session_id}/cancel", include_in_schema=False)
async def test_checkout_cancel(session_id: str, rt: Runtime) -> RedirectResponse:
    purchase = await _test_purchase(rt, session_id)
    if purchase.status == "pending":
        session = checkout_session_object(purchase, paid=False, expired=True)
        await _send_signed(rt, event_envelope("checkout.session.expired", session))
    return RedirectResponse(purchase.cancel_url or rt.settings.cancel_url(), status_code=303)
