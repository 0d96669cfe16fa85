"""Stripe does not deliver events in order. A `charge.refunded` that arrives while the purchase is still
pending (its `checkout.session.completed` is delayed by Stripe's retries, or repaired later by
reconcile) is acknowledged with 200, so Stripe never sends it again: it must not be forgotten, or the
customer keeps both the refund and the credits."""

from __future__ import annotations

import asyncio
import uuid

from tests.billing.conftest import Captured, FakeStripeServer, sql
from tests.billing.helpers import deliver, start_checkout
from tests.conftest import eventually
from tests.support.billing_service import RunningBilling


async def test_a_refund_delivered_before_the_payment_is_applied_when_the_purchase_is_credited(
    billing: RunningBilling, fake_stripe: FakeStripeServer, captured: Captured
) -> None:
    stripe = fake_stripe.stripe
    created = await start_checkout(billing, f"user-{uuid.uuid4().hex[:8]}", "pro")
    purchase_id = created["purchase_id"]
    session = stripe.mark_paid(created["session_id"])
    refund = stripe.event("charge.refunded", stripe.refund(created["session_id"], 1500))  # half of $30

    early = await deliver(billing, refund)
    assert early.status_code == 200, early.text
    completed = await deliver(billing, stripe.event("checkout.session.completed", session))
    assert completed.status_code == 200, completed.text
    # Stripe's retry of the refund (if it made one) changes nothing more.
    assert (await deliver(billing, refund)).json()["outcome"] == "duplicate"

    rows = await sql(
        billing.settings.database_url,
        "SELECT status, amount_refunded_cents, credits_refunded FROM purchases WHERE purchase_id = $1",
        purchase_id,
    )
    assert [tuple(r) for r in rows] == [("partially_refunded", 1500, 600)]
    outbox = await sql(
        billing.settings.database_url,
        "SELECT routing_key, (body->>'credits')::int AS credits FROM outbox "
        "WHERE body->>'purchase_id' = $1 ORDER BY id",
        purchase_id,
    )
    assert [tuple(r) for r in outbox] == [("billing.pack.purchased", 1200), ("billing.pack.refunded", 600)]

    await eventually(lambda: len(captured.of(purchase_id)) >= 2, timeout=20)
    await asyncio.sleep(1.0)
    assert [(m["event_type"], m["credits"], m["amount_cents"]) for m in captured.of(purchase_id)] == [
        ("billing.pack.purchased", 1200, 3000),
        ("billing.pack.refunded", 600, 1500),
    ]
