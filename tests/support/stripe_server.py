"""A small stateful Stripe-compatible HTTP server for tests (nothing on PyPI fakes Checkout Sessions).

Speaks the part of Stripe's v1 API billing uses, in Stripe's wire format (form-encoded requests with
deepObject keys like `line_items[0][price_data][currency]`, JSON responses, list objects with
`has_more`), so the real `stripe` SDK is the client:

- POST /v1/checkout/sessions (honours Idempotency-Key: a repeated key replays the first response)
- GET  /v1/checkout/sessions/{id}, GET /v1/checkout/sessions (created[gte|gt|lte|lt], limit,
  starting_after, status)
- GET  /v1/payment_intents/{id}, POST /v1/refunds

Every request is recorded (method, path, headers, raw form pairs, decoded params) for assertions.
Test helpers move sessions along (`mark_paid`, `expire`, `refund`) and build webhook events signed
exactly as Stripe signs them (`Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

API_KEY = "sk_test_fake_stripe_key"


def _id(prefix: str) -> str:
    return f"{prefix}_test_{secrets.token_hex(12)}"


def decode_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding back to nested dicts/lists: `a[b][0][c]=v` → {"a": {"b": [{"c": "v"}]}}."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = [key.split("[", 1)[0]] + [p.rstrip("]") for p in key.split("[")[1:]]
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def listify(value: Any) -> Any:
        if isinstance(value, dict):
            converted = {k: listify(v) for k, v in value.items()}
            if converted and all(k.isdigit() for k in converted):
                return [converted[k] for k in sorted(converted, key=int)]
            return converted
        return value

    result: dict[str, Any] = listify(root)
    return result


def sign_payload(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    form: list[tuple[str, str]]
    params: dict[str, Any]


@dataclass
class FakeStripe:
    api_key: str = API_KEY
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)
    # Answer every API call with this HTTP status (e.g. 500) while set: simulates a Stripe outage.
    fail_with: int | None = None
    _idempotent: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    _sequence: itertools.count[int] = field(default_factory=itertools.count)

    # -- helpers for tests -------------------------------------------------------------------------

    def created_sessions(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/v1/checkout/sessions"]

    def mark_paid(self, session_id: str, *, payment_status: str = "paid") -> dict[str, Any]:
        """The customer paid: the session completes, with a PaymentIntent and a Charge behind it."""
        session = self.sessions[session_id]
        intent_data = session.pop("_payment_intent_data", {}) or {}
        intent_id = _id("pi")
        charge_id = _id("ch")
        amount = session["amount_total"]
        self.payment_intents[intent_id] = {
            "id": intent_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_received": amount if payment_status == "paid" else 0,
            "currency": session["currency"],
            "latest_charge": charge_id,
            "livemode": False,
            "metadata": dict(intent_data.get("metadata") or {}),
            "status": "succeeded" if payment_status == "paid" else "processing",
            "created": int(time.time()),
        }
        # Stripe does not copy the PaymentIntent's metadata onto its charges.
        self.charges[charge_id] = {
            "id": charge_id,
            "object": "charge",
            "amount": amount,
            "amount_captured": amount,
            "amount_refunded": 0,
            "captured": True,
            "created": int(time.time()),
            "currency": session["currency"],
            "livemode": False,
            "metadata": {},
            "paid": True,
            "payment_intent": intent_id,
            "refunded": False,
            "refunds": {
                "object": "list",
                "data": [],
                "has_more": False,
                "url": f"/v1/charges/{charge_id}/refunds",
            },
            "status": "succeeded",
        }
        session.update(
            status="complete",
            payment_status=payment_status,
            payment_intent=intent_id,
            customer_details={
                "email": "buyer@example.com",
                "name": "Test Buyer",
                "address": None,
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            },
        )
        return self.public(session)

    def settle_async_payment(self, session_id: str) -> dict[str, Any]:
        session = self.sessions[session_id]
        session["payment_status"] = "paid"
        self.payment_intents[session["payment_intent"]]["status"] = "succeeded"
        return self.public(session)

    def expire(self, session_id: str) -> dict[str, Any]:
        session = self.sessions[session_id]
        session.update(status="expired")
        return self.public(session)

    def refund(self, session_id: str, amount: int | None = None) -> dict[str, Any]:
        """Refunds `amount` (default: the rest) of the session's charge; returns the charge (cumulative)."""
        intent = self.payment_intents[self.sessions[session_id]["payment_intent"]]
        charge = self.charges[intent["latest_charge"]]
        self._refund_charge(charge, amount)
        snapshot: dict[str, Any] = json.loads(json.dumps(charge))
        return snapshot

    def event(self, event_type: str, obj: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
        """A v1 webhook event, as Stripe posts it."""
        return {
            "id": _id("evt"),
            "object": "event",
            "api_version": "2026-10-28.endive",
            "created": int(time.time()) if created is None else created,
            "data": {"object": obj},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": event_type,
        }

    @staticmethod
    def signed(
        event: dict[str, Any], secret: str, *, timestamp: int | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """(raw body, headers) for posting `event` as Stripe would."""
        payload = json.dumps(event, indent=2).encode()  # Stripe's bodies are pretty-printed JSON
        return payload, {
            "Stripe-Signature": sign_payload(payload, secret, timestamp),
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        }

    @staticmethod
    def public(obj: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in json.loads(json.dumps(obj)).items() if not k.startswith("_")}

    # -- the HTTP API --------------------------------------------------------------------------------

    def _refund_charge(self, charge: dict[str, Any], amount: int | None) -> dict[str, Any]:
        remaining = charge["amount"] - charge["amount_refunded"]
        amount = remaining if amount is None else amount
        if amount <= 0 or amount > remaining:
            raise ValueError(f"cannot refund {amount}; {remaining} left")
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        refund = {
            "id": _id("re"),
            "object": "refund",
            "amount": amount,
            "charge": charge["id"],
            "currency": charge["currency"],
            "payment_intent": charge["payment_intent"],
            "status": "succeeded",
            "created": int(time.time()),
            "metadata": {},
        }
        charge["refunds"]["data"].insert(0, refund)
        return refund

    def _new_session(self, params: dict[str, Any]) -> dict[str, Any]:
        line_items = params.get("line_items") or []
        amount = 0
        currency = None
        for item in line_items:
            price = item.get("price_data") or {}
            amount += int(price.get("unit_amount", 0)) * int(item.get("quantity", 1))
            currency = price.get("currency", currency)
        session_id = f"cs_test_{secrets.token_hex(24)}"
        created = int(time.time())
        return {
            "id": session_id,
            "object": "checkout.session",
            "amount_subtotal": amount,
            "amount_total": amount,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
            "created": created,
            "currency": currency,
            "customer": None,
            "customer_details": None,
            "customer_email": params.get("customer_email"),
            "expires_at": created + 24 * 3600,
            "livemode": False,
            "metadata": dict(params.get("metadata") or {}),
            "mode": params.get("mode"),
            "payment_intent": None,
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "status": "open",
            "success_url": params.get("success_url"),
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            "_payment_intent_data": params.get("payment_intent_data") or {},
            "_sequence": next(self._sequence),
        }

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        pairs = parse_qsl(body.decode(), keep_blank_values=True) if body else []
        query = list(request.query_params.multi_items())
        form = pairs or query
        record = RecordedRequest(
            request.method,
            request.url.path,
            {k.lower(): v for k, v in request.headers.items()},
            form,
            decode_form(form),
        )
        self.requests.append(record)
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Invalid API Key provided.")
        if self.fail_with is not None:
            return _error(self.fail_with, "Simulated Stripe failure.", "api_error")
        key = request.headers.get("idempotency-key")
        if request.method == "POST" and key and key in self._idempotent:
            status, payload = self._idempotent[key]
            return JSONResponse(payload, status_code=status, headers={"Idempotent-Replayed": "true"})
        status, payload = self._route(request.method, request.url.path, record.params)
        if request.method == "POST" and key:
            self._idempotent[key] = (status, payload)
        return JSONResponse(payload, status_code=status)

    def _route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if parts[:3] == ["v1", "checkout", "sessions"]:
            if len(parts) == 3 and method == "POST":
                if params.get("mode") not in ("payment", "setup", "subscription"):
                    return 400, _error_body("Missing required param: mode.", param="mode")
                session = self._new_session(params)
                self.sessions[session["id"]] = session
                return 200, self.public(session)
            if len(parts) == 3 and method == "GET":
                return 200, self._list_sessions(params)
            if len(parts) == 4 and method == "GET":
                found = self.sessions.get(parts[3])
                if found is None:
                    return 404, _error_body(
                        f"No such checkout.session: '{parts[3]}'", code="resource_missing"
                    )
                return 200, self.public(found)
        if parts[:2] == ["v1", "payment_intents"] and len(parts) == 3 and method == "GET":
            intent = self.payment_intents.get(parts[2])
            if intent is None:
                return 404, _error_body(f"No such payment_intent: '{parts[2]}'", code="resource_missing")
            return 200, dict(intent)
        if path == "/v1/refunds" and method == "POST":
            intent = self.payment_intents.get(params.get("payment_intent", ""))
            if intent is None:
                return 400, _error_body("No such payment_intent.", param="payment_intent")
            charge = self.charges[intent["latest_charge"]]
            try:
                amount = int(params["amount"]) if "amount" in params else None
                return 200, self._refund_charge(charge, amount)
            except ValueError as exc:
                return 400, _error_body(str(exc), param="amount")
        return 404, _error_body(f"Unrecognized request URL ({method}: {path}).")

    def _list_sessions(self, params: dict[str, Any]) -> dict[str, Any]:
        created = params.get("created")
        bounds = created if isinstance(created, dict) else ({"gte": created} if created else {})
        checks = {
            "gte": lambda c, v: c >= v,
            "gt": lambda c, v: c > v,
            "lte": lambda c, v: c <= v,
            "lt": lambda c, v: c < v,
        }
        items = sorted(self.sessions.values(), key=lambda s: (s["created"], s["_sequence"]), reverse=True)
        items = [
            s
            for s in items
            if all(checks[op](s["created"], int(v)) for op, v in bounds.items() if op in checks)
            and (not params.get("status") or s["status"] == params["status"])
        ]
        after = params.get("starting_after")
        if after:
            ids = [s["id"] for s in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        limit = max(1, min(100, int(params.get("limit", 10))))
        page = items[:limit]
        return {
            "object": "list",
            "data": [self.public(s) for s in page],
            "has_more": len(items) > limit,
            "url": "/v1/checkout/sessions",
        }

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST", "DELETE"])])


def _error_body(message: str, *, type_: str = "invalid_request_error", **extra: Any) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, **extra}}


def _error(status: int, message: str, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(_error_body(message, type_=type_), status_code=status)
