"""Local test mode (docs/api.md, Billing): no STRIPE_API_KEY, billing serves its own checkout page whose Pay
button sends a correctly signed checkout.session.completed through the webhook path."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from pydantic import ValidationError

from services.billing.config import DEV_WEBHOOK_SECRET, BillingSettings
from services.billing.models import Purchase
from services.billing.testmode import checkout_session_object, event_envelope
from tests.billing.conftest import Captured, FakeStripeServer, sql
from tests.billing.helpers import start_checkout
from tests.billing.stripe_spec import fixtures
from tests.conftest import eventually
from tests.support.billing_service import RunningBilling, running_billing


@pytest.fixture(scope="module")
async def test_mode_billing(
    make_database_url: Callable[[str], str], rabbitmq_url: str, broker_namespace: str
) -> AsyncIterator[RunningBilling]:
    async with running_billing(
        database_url=make_database_url("billing_test_mode"),
        rabbitmq_url=rabbitmq_url,
        broker_namespace=broker_namespace,
        webhook_secret=None,  # test mode falls back to the fixed development secret
        portal_url="http://portal.test/",
    ) as running:
        yield running


async def test_pay_on_the_test_checkout_page_credits_through_the_webhook(
    test_mode_billing: RunningBilling, captured: Captured
) -> None:
    billing = test_mode_billing
    assert billing.settings.test_mode and billing.settings.webhook_secret == DEV_WEBHOOK_SECRET
    user = f"user-{uuid.uuid4().hex[:8]}"
    created = await start_checkout(billing, user, "pro")
    assert created["url"] == f"{billing.url}/test-checkout/{created['session_id']}"

    async with billing.client() as client:
        page = await client.get(created["url"])
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "TEST MODE" in page.text
        assert "Pro" in page.text and "$30.00" in page.text and "1,200" in page.text
        pay_action = re.search(r'action="([^"]+/pay)"', page.text)
        assert pay_action is not None and re.search(r'action="[^"]+/cancel"', page.text)

        paid = await client.post(pay_action.group(1))
        assert paid.status_code == 303 and paid.headers["location"] == "http://portal.test/?checkout=success"

        purchases = (
            await client.get(f"/v1/users/{user}/purchases", headers=billing.internal_headers())
        ).json()
        assert [(p["purchase_id"], p["status"]) for p in purchases["data"]] == [
            (created["purchase_id"], "paid")
        ]

        again = await client.get(created["url"])
        assert "TEST MODE" in again.text and "already" in again.text and "/pay" not in again.text
        # Paying twice (a double click) credits once.
        await client.post(pay_action.group(1))

    # It went through the webhook path: a verified event in the inbox, exactly like Stripe's.
    inbox = await sql(
        billing.settings.database_url,
        "SELECT type, outcome, payload FROM stripe_events WHERE purchase_id = $1",
        created["purchase_id"],
    )
    assert [(r["type"], r["outcome"]) for r in inbox] == [("checkout.session.completed", "credited")]
    await eventually(lambda: captured.of(created["purchase_id"]), timeout=20)
    [message] = captured.of(created["purchase_id"])
    assert (message["user_id"], message["pack"], message["credits"], message["unlocks_api"]) == (
        user,
        "pro",
        1200,
        True,
    )


async def test_cancel_expires_the_purchase(test_mode_billing: RunningBilling) -> None:
    billing = test_mode_billing
    created = await start_checkout(
        billing, f"user-{uuid.uuid4().hex[:8]}", "starter", cancel_url="http://shop.test/back"
    )
    async with billing.client() as client:
        cancelled = await client.post(f"/test-checkout/{created['session_id']}/cancel")
        assert cancelled.status_code == 303 and cancelled.headers["location"] == "http://shop.test/back"
        missing = await client.get("/test-checkout/cs_test_local_nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    rows = await sql(
        billing.settings.database_url,
        "SELECT status FROM purchases WHERE purchase_id = $1",
        created["purchase_id"],
    )
    assert [r["status"] for r in rows] == ["expired"]


async def test_test_checkout_does_not_exist_with_a_stripe_key(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    created = await start_checkout(billing, f"user-{uuid.uuid4().hex[:8]}", "starter")
    async with billing.client() as client:
        page = await client.get(f"/test-checkout/{created['session_id']}")
        pay = await client.post(f"/test-checkout/{created['session_id']}/pay")
    assert page.status_code == 404 and pay.status_code == 404
    rows = await sql(
        billing.settings.database_url,
        "SELECT status FROM purchases WHERE purchase_id = $1",
        created["purchase_id"],
    )
    assert [r["status"] for r in rows] == ["pending"]


def test_production_refuses_local_test_mode() -> None:
    secrets = {
        "internal_token": "prod-internal",
        "admin_token": "prod-admin",
        "public_base_url": "https://gateway.example.com",
    }
    with pytest.raises(ValidationError, match="STRIPE_API_KEY"):
        BillingSettings(environment="production", **secrets)
    with pytest.raises(ValidationError, match="STRIPE_WEBHOOK_SECRET"):
        BillingSettings(environment="production", stripe_api_key="sk_live_x", **secrets)
    ok = BillingSettings(
        environment="production", stripe_api_key="sk_live_x", stripe_webhook_secret="whsec_x", **secrets
    )
    assert not ok.test_mode and ok.webhook_secret == "whsec_x"


def test_test_mode_events_have_stripes_shape() -> None:
    purchase = Purchase(
        purchase_id="pur_1",
        user_id="u1",
        pack="pro",
        credits=1200,
        unlocks_api=True,
        amount_cents=3000,
        currency="usd",
        status="pending",
        stripe_checkout_session_id="cs_test_local_1",
        success_url="http://a/ok",
        cancel_url="http://a/no",
    )
    session = checkout_session_object(purchase, paid=True)
    assert set(session) == set(fixtures()["checkout.session"])
    assert session["object"] == "checkout.session" and session["mode"] == "payment"
    assert (session["payment_status"], session["status"]) == ("paid", "complete")
    assert session["metadata"] == {"user_id": "u1", "pack": "pro", "purchase_id": "pur_1"}
    assert session["amount_total"] == 3000 and session["payment_intent"].startswith("pi_")
    event = event_envelope("checkout.session.completed", session)
    assert set(event) == set(fixtures()["event"])
    assert event["data"] == {"object": session} and event["object"] == "event"
