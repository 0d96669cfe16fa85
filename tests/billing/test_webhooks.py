"""Stripe webhooks: signed like Stripe, recorded with inbox + purchase + outbox in one transaction,
published exactly once however often (and however concurrently) Stripe delivers."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from tests.billing.conftest import Captured, FakeStripeServer, sql
from tests.billing.helpers import deliver, start_checkout
from tests.conftest import eventually
from tests.support.billing_service import RunningBilling


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def _purchase(billing: RunningBilling, purchase_id: str) -> dict[str, Any]:
    rows = await sql(
        billing.settings.database_url, "SELECT * FROM purchases WHERE purchase_id = $1", purchase_id
    )
    assert len(rows) == 1
    return dict(rows[0])


async def _outbox(billing: RunningBilling, purchase_id: str) -> list[dict[str, Any]]:
    rows = await sql(
        billing.settings.database_url,
        "SELECT routing_key, body::text AS body, sent_at FROM outbox WHERE body->>'purchase_id' = $1 ORDER BY id",
        purchase_id,
    )
    return [dict(r) for r in rows]


async def _settle(captured: Captured, purchase_id: str, count: int = 1) -> list[dict[str, Any]]:
    """Waits for `count` messages, then a little longer so that a duplicate would have shown up."""
    await eventually(lambda: len(captured.of(purchase_id)) >= count, timeout=20)
    await asyncio.sleep(1.5)
    return captured.of(purchase_id)


async def test_paid_checkout_delivered_many_times_is_published_once(
    billing: RunningBilling, fake_stripe: FakeStripeServer, captured: Captured
) -> None:
    stripe = fake_stripe.stripe
    user = _user()
    created = await start_checkout(billing, user, "pro")
    purchase_id = created["purchase_id"]
    session = stripe.mark_paid(created["session_id"])
    completed = stripe.event("checkout.session.completed", session)

    # The same event five times in a row...
    async with billing.client() as client:
        for _ in range(5):
            response = await deliver(billing, completed, client=client)
            assert response.status_code == 200, response.text
        # ...then, all at once, five more copies of it, five fresh "completed" events and five
        # "async_payment_succeeded" for the same session (Stripe may send both kinds).
        others = [stripe.event("checkout.session.completed", session) for _ in range(5)]
        others += [stripe.event("checkout.session.async_payment_succeeded", session) for _ in range(5)]
        responses = await asyncio.gather(
            *(deliver(billing, e, client=client) for e in [completed] * 5 + others)
        )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]

    purchase = await _purchase(billing, purchase_id)
    assert purchase["status"] == "paid"
    assert purchase["stripe_payment_intent_id"] == session["payment_intent"]
    outbox = await _outbox(billing, purchase_id)
    assert [row["routing_key"] for row in outbox] == ["billing.pack.purchased"]
    inbox = await sql(
        billing.settings.database_url,
        "SELECT event_id, outcome FROM stripe_events WHERE purchase_id = $1",
        purchase_id,
    )
    assert len(inbox) == 11  # one row per distinct Stripe event id
    assert sorted(r["outcome"] for r in inbox).count("credited") == 1

    messages = await _settle(captured, purchase_id)
    assert len(messages) == 1
    message = messages[0]
    assert message == {
        "event_id": message["event_id"],
        "event_type": "billing.pack.purchased",
        "occurred_at": message["occurred_at"],
        "purchase_id": purchase_id,
        "user_id": user,
        "pack": "pro",
        "credits": 1200,
        "unlocks_api": True,
        "amount_cents": 3000,
        "currency": "usd",
        "stripe_checkout_session_id": created["session_id"],
    }
    amqp = next(m for _, body, m in captured.messages if body.get("purchase_id") == purchase_id)
    assert amqp.message_id == message["event_id"] and amqp.type == "billing.pack.purchased"
    assert amqp.content_type == "application/json" and amqp.delivery_mode == 2
    assert (await _outbox(billing, purchase_id))[0]["sent_at"] is not None


async def test_unpaid_completion_waits_for_the_async_payment(
    billing: RunningBilling, fake_stripe: FakeStripeServer, captured: Captured
) -> None:
    stripe = fake_stripe.stripe
    created = await start_checkout(billing, _user(), "standard")
    purchase_id = created["purchase_id"]
    session = stripe.mark_paid(created["session_id"], payment_status="unpaid")
    assert (await deliver(billing, stripe.event("checkout.session.completed", session))).status_code == 200
    assert (await _purchase(billing, purchase_id))["status"] == "pending"
    assert await _outbox(billing, purchase_id) == []

    settled = stripe.settle_async_payment(created["session_id"])
    assert (
        await deliver(billing, stripe.event("checkout.session.async_payment_succeeded", settled))
    ).status_code == 200
    assert (await _purchase(billing, purchase_id))["status"] == "paid"
    messages = await _settle(captured, purchase_id)
    assert [m["credits"] for m in messages] == [500]


async def test_failed_async_payment_and_expiry(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    stripe = fake_stripe.stripe
    failing = await start_checkout(billing, _user(), "starter")
    session = stripe.mark_paid(failing["session_id"], payment_status="unpaid")
    await deliver(billing, stripe.event("checkout.session.completed", session))
    assert (
        await deliver(billing, stripe.event("checkout.session.async_payment_failed", session))
    ).status_code == 200
    assert (await _purchase(billing, failing["purchase_id"]))["status"] == "failed"

    abandoned = await start_checkout(billing, _user(), "starter")
    expired = stripe.expire(abandoned["session_id"])
    assert (await deliver(billing, stripe.event("checkout.session.expired", expired))).status_code == 200
    assert (await _purchase(billing, abandoned["purchase_id"]))["status"] == "expired"
    assert await _outbox(billing, failing["purchase_id"]) == []
    assert await _outbox(billing, abandoned["purchase_id"]) == []


async def test_other_event_types_are_acknowledged_and_ignored(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    event = fake_stripe.stripe.event("customer.created", {"id": "cus_test_1", "object": "customer"})
    response = await deliver(billing, event)
    assert response.status_code == 200 and response.json()["outcome"] == "ignored"
    rows = await sql(
        billing.settings.database_url, "SELECT outcome FROM stripe_events WHERE event_id = $1", event["id"]
    )
    assert [r["outcome"] for r in rows] == ["ignored"]


async def test_session_that_disagrees_with_the_purchase_is_recorded_not_credited(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    stripe = fake_stripe.stripe
    created = await start_checkout(billing, _user(), "business")
    session = stripe.mark_paid(created["session_id"])
    tampered = {**session, "amount_total": 100, "metadata": {**session["metadata"], "pack": "starter"}}
    response = await deliver(billing, stripe.event("checkout.session.completed", tampered))
    assert response.status_code == 200 and response.json()["outcome"] == "held_for_review"
    purchase = await _purchase(billing, created["purchase_id"])
    assert purchase["status"] == "pending"
    assert "amount_total 100" in purchase["review_reason"] and "starter" in purchase["review_reason"]
    assert await _outbox(billing, created["purchase_id"]) == []


async def test_session_without_a_purchase_row_is_rebuilt_from_metadata_when_it_matches_the_catalog(
    billing: RunningBilling, fake_stripe: FakeStripeServer, captured: Captured
) -> None:
    stripe = fake_stripe.stripe
    user = _user()
    base = {
        "object": "checkout.session",
        "mode": "payment",
        "payment_status": "paid",
        "status": "complete",
        "currency": "usd",
        "client_reference_id": user,
        "payment_intent": f"pi_test_{uuid.uuid4().hex[:12]}",
    }
    good_id, bad_id = f"pur_{uuid.uuid4().hex}", f"pur_{uuid.uuid4().hex}"
    good = {
        **base,
        "id": f"cs_test_{uuid.uuid4().hex}",
        "amount_total": 1500,
        "metadata": {"user_id": user, "pack": "standard", "purchase_id": good_id},
    }
    cheap = {
        **base,
        "id": f"cs_test_{uuid.uuid4().hex}",
        "amount_total": 1,
        "metadata": {"user_id": user, "pack": "business", "purchase_id": bad_id},
    }
    unknown_pack = {
        **base,
        "id": f"cs_test_{uuid.uuid4().hex}",
        "amount_total": 1500,
        "metadata": {"user_id": user, "pack": "gold", "purchase_id": f"pur_{uuid.uuid4().hex}"},
    }
    assert (await deliver(billing, stripe.event("checkout.session.completed", good))).json()[
        "outcome"
    ] == "credited"
    assert (await deliver(billing, stripe.event("checkout.session.completed", cheap))).json()[
        "outcome"
    ] == "held_for_review"
    assert (await deliver(billing, stripe.event("checkout.session.completed", unknown_pack))).json()[
        "outcome"
    ] == ("ignored_unknown_session")
    assert (await _purchase(billing, good_id))["status"] == "paid"
    assert (await _purchase(billing, bad_id))["status"] == "pending"
    messages = await _settle(captured, good_id)
    assert [(m["pack"], m["credits"]) for m in messages] == [("standard", 500)]
    assert captured.of(bad_id) == []


async def test_partial_then_full_refund_of_a_pro_pack(
    billing: RunningBilling, fake_stripe: FakeStripeServer, captured: Captured
) -> None:
    stripe = fake_stripe.stripe
    created = await start_checkout(billing, _user(), "pro")
    purchase_id = created["purchase_id"]
    session = stripe.mark_paid(created["session_id"])
    await deliver(billing, stripe.event("checkout.session.completed", session))
    await _settle(captured, purchase_id)

    first = stripe.event("charge.refunded", stripe.refund(created["session_id"], 1000))  # a third of $30
    assert (await deliver(billing, first)).status_code == 200
    assert (await deliver(billing, first)).json()["outcome"] == "duplicate"
    purchase = await _purchase(billing, purchase_id)
    assert (purchase["status"], purchase["credits_refunded"], purchase["amount_refunded_cents"]) == (
        "partially_refunded",
        400,
        1000,
    )
    refunds = (await _settle(captured, purchase_id, 2))[1:]
    assert [(m["event_type"], m["credits"], m["amount_cents"]) for m in refunds] == [
        ("billing.pack.refunded", 400, 1000)
    ]
    assert refunds[0]["pack"] == "pro" and refunds[0]["currency"] == "usd"

    # A refund of 1 cent adds no whole credit: recorded, nothing published.
    tiny = stripe.event("charge.refunded", stripe.refund(created["session_id"], 1))
    assert (await deliver(billing, tiny)).json()["outcome"] == "partially_refunded_no_new_credits"

    rest = stripe.event("charge.refunded", stripe.refund(created["session_id"]))  # the remaining $19.99
    assert (await deliver(billing, rest)).status_code == 200
    # A late copy of the first (smaller cumulative) refund changes nothing.
    late = stripe.event("charge.refunded", {**first["data"]["object"]})
    assert (await deliver(billing, late)).json()["outcome"] == "refund_already_recorded"
    purchase = await _purchase(billing, purchase_id)
    assert (purchase["status"], purchase["credits_refunded"], purchase["amount_refunded_cents"]) == (
        "refunded",
        1200,
        3000,
    )
    messages = await _settle(captured, purchase_id, 3)
    assert [(m["event_type"], m["credits"]) for m in messages] == [
        ("billing.pack.purchased", 1200),
        ("billing.pack.refunded", 400),
        ("billing.pack.refunded", 1200),  # cumulative: credits claws back the 800 not yet taken
    ]


async def test_refund_found_through_the_payment_intents_metadata(
    billing: RunningBilling, fake_stripe: FakeStripeServer, captured: Captured
) -> None:
    """A purchase paid through an event that did not name its PaymentIntent: the refund's charge has
    no metadata, so billing asks Stripe for the PaymentIntent, whose metadata names the purchase."""
    stripe = fake_stripe.stripe
    created = await start_checkout(billing, _user(), "standard")
    purchase_id = created["purchase_id"]
    session = stripe.mark_paid(created["session_id"])
    await deliver(billing, stripe.event("checkout.session.completed", {**session, "payment_intent": None}))
    assert (await _purchase(billing, purchase_id))["stripe_payment_intent_id"] is None

    charge = stripe.refund(created["session_id"], 750)
    assert charge["metadata"] == {}
    response = await deliver(billing, stripe.event("charge.refunded", charge))
    assert response.json()["outcome"] == "partially_refunded"
    purchase = await _purchase(billing, purchase_id)
    assert (
        purchase["credits_refunded"] == 250
        and purchase["stripe_payment_intent_id"] == charge["payment_intent"]
    )
    assert any(r.path == f"/v1/payment_intents/{charge['payment_intent']}" for r in stripe.requests)
    messages = await _settle(captured, purchase_id, 2)
    assert [m["credits"] for m in messages] == [500, 250]


async def test_refund_for_an_unknown_charge_is_acknowledged(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    charge = {
        "id": "ch_test_unknown",
        "object": "charge",
        "amount": 500,
        "amount_refunded": 500,
        "metadata": {},
        "payment_intent": None,
        "currency": "usd",
    }
    response = await deliver(billing, fake_stripe.stripe.event("charge.refunded", charge))
    assert response.status_code == 200 and response.json()["outcome"] == "ignored_unknown_charge"
