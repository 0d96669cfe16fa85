"""A webhook whose Stripe-Signature is bad, missing or stale, or whose body was altered: 400 in the
error envelope, and nothing recorded (a fresh billing database, so "nothing" means empty tables)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from tests.billing.conftest import FakeStripeServer, billing_on_fake_stripe, sql
from tests.support.billing_service import WEBHOOK_SECRET, RunningBilling
from tests.support.stripe_server import sign_payload

fresh_billing = billing_on_fake_stripe("fresh_billing", "billing_signatures", scope="module")


def _paid_session_event(fake_stripe: FakeStripeServer) -> dict[str, Any]:
    """Would be credited if accepted: billing rebuilds an unknown purchase from valid metadata."""
    user = f"user-{uuid.uuid4().hex[:8]}"
    session = {
        "id": f"cs_test_{uuid.uuid4().hex}",
        "object": "checkout.session",
        "mode": "payment",
        "payment_status": "paid",
        "status": "complete",
        "amount_total": 3000,
        "currency": "usd",
        "client_reference_id": user,
        "payment_intent": "pi_test_x",
        "metadata": {"user_id": user, "pack": "pro", "purchase_id": f"pur_{uuid.uuid4().hex}"},
    }
    return fake_stripe.stripe.event("checkout.session.completed", session)


def _cases(event: dict[str, Any]) -> dict[str, tuple[bytes, dict[str, str]]]:
    body = json.dumps(event).encode()
    now = int(time.time())
    good = sign_payload(body, WEBHOOK_SECRET, now)
    tampered = body.replace(b'"amount_total": 3000', b'"amount_total": 3001')
    assert tampered != body
    return {
        "wrong secret": (body, {"Stripe-Signature": sign_payload(body, "whsec_someone_else", now)}),
        "missing header": (body, {}),
        "empty header": (body, {"Stripe-Signature": ""}),
        "garbage header": (body, {"Stripe-Signature": "not-a-signature"}),
        "no v1 scheme": (body, {"Stripe-Signature": good.replace("v1=", "v0=")}),
        "stale (301 s old)": (body, {"Stripe-Signature": sign_payload(body, WEBHOOK_SECRET, now - 301)}),
        "tampered body": (tampered, {"Stripe-Signature": good}),
        "signed non-event": (
            b'{"hello": "world"}',
            {"Stripe-Signature": sign_payload(b'{"hello": "world"}', WEBHOOK_SECRET)},
        ),
    }


async def _counts(billing: RunningBilling) -> dict[str, int]:
    url = billing.settings.database_url
    return {
        table: (await sql(url, f"SELECT count(*) AS n FROM {table}"))[0]["n"]
        for table in ("stripe_events", "purchases", "outbox")
    }


async def test_bad_signatures_are_refused_and_nothing_is_recorded(
    fresh_billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    event = _paid_session_event(fake_stripe)
    async with fresh_billing.client() as client:
        for name, (body, headers) in _cases(event).items():
            response = await client.post(
                "/v1/webhooks/stripe", content=body, headers={**headers, "content-type": "application/json"}
            )
            assert response.status_code == 400, name
            error = response.json()["error"]
            assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error", name
    assert await _counts(fresh_billing) == {"stripe_events": 0, "purchases": 0, "outbox": 0}

    # Control: the very same event, correctly signed and fresh, is accepted and recorded.
    body = json.dumps(event).encode()
    async with fresh_billing.client() as client:
        accepted = await client.post(
            "/v1/webhooks/stripe",
            content=body,
            headers={"Stripe-Signature": sign_payload(body, WEBHOOK_SECRET)},
        )
    assert accepted.status_code == 200 and accepted.json()["outcome"] == "credited"
    assert await _counts(fresh_billing) == {"stripe_events": 1, "purchases": 1, "outbox": 1}


async def test_a_signature_within_the_tolerance_is_accepted(
    fresh_billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    event = fake_stripe.stripe.event("customer.created", {"id": "cus_1", "object": "customer"})
    body = json.dumps(event).encode()
    header = sign_payload(body, WEBHOOK_SECRET, int(time.time()) - 240)
    # Stripe may send several v1 signatures (during secret rotation); one matching is enough.
    header += ",v1=" + "0" * 64
    async with fresh_billing.client() as client:
        response = await client.post(
            "/v1/webhooks/stripe", content=body, headers={"Stripe-Signature": header}
        )
    assert response.status_code == 200
