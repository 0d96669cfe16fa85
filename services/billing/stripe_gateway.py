"""The Stripe adapter: every call to Stripe's API and its webhook signature scheme lives here.

The API version is pinned in this one place (`STRIPE_API_VERSION`), so an SDK upgrade never silently
changes the shape of the objects billing reads.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import stripe

from services.billing.catalog import Pack

STRIPE_API_VERSION = "2026-10-28.endive"
WEBHOOK_TOLERANCE_SECONDS = 300


class StripeFailure(Exception):
    """Stripe could not be reached or refused the request."""


class InvalidSignature(Exception):
    """The webhook's Stripe-Signature is missing, wrong or stale, or the body is not an event."""


@dataclass(frozen=True)
class CreatedSession:
    id: str
    url: str


@dataclass(frozen=True)
class CheckoutRequest:
    purchase_id: str
    user_id: str
    pack: Pack
    success_url: str
    cancel_url: str

    @property
    def metadata(self) -> dict[str, str]:
        return {"user_id": self.user_id, "pack": self.pack.id, "purchase_id": self.purchase_id}


class StripeGateway:
    def __init__(self, api_key: str, api_base: str | None = None) -> None:
        base_addresses: dict[str, str] = {"api": api_base.rstrip("/")} if api_base else {}
        self._client = stripe.StripeClient(
            api_key,
            stripe_version=STRIPE_API_VERSION,
            base_addresses=base_addresses,  # type: ignore[arg-type]
            # Retries are safe: creation carries an idempotency key.
            max_network_retries=2,
        )

    async def create_checkout_session(self, request: CheckoutRequest) -> CreatedSession:
        pack = request.pack
        params: dict[str, Any] = {
            "mode": "payment",
            "line_items": [
                {
                    "price_data": {
                        "currency": pack.currency,
                        "unit_amount": pack.price_cents,
                        "product_data": {
                            "name": pack.name,
                            "description": f"{pack.credits} credits",
                        },
                    },
                    "quantity": 1,
                }
            ],
            "client_reference_id": request.user_id,
            "metadata": request.metadata,
            # Copied onto the PaymentIntent, so a refund can be traced back to the purchase.
            "payment_intent_data": {"metadata": request.metadata},
            "success_url": request.success_url,
            "cancel_url": request.cancel_url,
        }
        try:
            session = await self._client.v1.checkout.sessions.create_async(
                params,  # type: ignore[arg-type]
                options={"idempotency_key": f"checkout-session-{request.purchase_id}"},
            )
        except stripe.StripeError as exc:
            raise StripeFailure(str(exc.user_message or exc)) from exc
        if not session.id or not session.url:
            raise StripeFailure("Stripe returned a Checkout Session without id or url")
        return CreatedSession(id=session.id, url=session.url)

    async def checkout_sessions_since(self, created_gte: int) -> AsyncIterator[dict[str, Any]]:
        """Every Checkout Session created at or after `created_gte` (unix seconds), all pages."""
        try:
            page = await self._client.v1.checkout.sessions.list_async(
                {"created": {"gte": created_gte}, "limit": 100}
            )
            async for session in page.auto_paging_iter():
                yield session.to_dict()
        except stripe.StripeError as exc:
            raise StripeFailure(str(exc.user_message or exc)) from exc

    async def payment_intent_metadata(self, payment_intent_id: str) -> dict[str, str]:
        try:
            intent = await self._client.v1.payment_intents.retrieve_async(payment_intent_id)
        except stripe.StripeError as exc:
            raise StripeFailure(str(exc.user_message or exc)) from exc
        metadata: dict[str, Any] = intent.to_dict().get("metadata") or {}
        return {str(k): str(v) for k, v in metadata.items()}


def verify_webhook(payload: bytes, signature_header: str | None, secret: str) -> dict[str, Any]:
    """Checks Stripe's signature over the raw body (300 s tolerance) and returns the event as a dict."""
    try:
        stripe.WebhookSignature.verify_header(
            payload, signature_header, secret, tolerance=WEBHOOK_TOLERANCE_SECONDS
        )
    except stripe.SignatureVerificationError as exc:
        raise InvalidSignature(str(exc).split(". ")[0]) from None
    except UnicodeDecodeError:
        raise InvalidSignature("the body is not UTF-8") from None
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise InvalidSignature("the body is not JSON") from None
    if (
        not isinstance(event, dict)
        or event.get("object") != "event"
        or not isinstance(event.get("id"), str)
        or not isinstance(event.get("type"), str)
        or not isinstance(event.get("data"), dict)
        or not isinstance(event["data"].get("object"), dict)
    ):
        raise InvalidSignature("the body is not a Stripe event")
    return event


def sign_webhook(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """The Stripe-Signature header Stripe would send: `t=<unix>,v1=<hex HMAC-SHA256(secret, "t.payload")>`."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"
