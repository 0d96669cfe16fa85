"""POST /v1/checkout/sessions with the real stripe SDK against the fake Stripe server; the form bodies
it sends are checked against Stripe's OpenAPI spec."""

from __future__ import annotations

import uuid

from services.billing.stripe_gateway import STRIPE_API_VERSION
from tests.billing.conftest import FakeStripeServer, sql
from tests.billing.helpers import start_checkout
from tests.billing.stripe_spec import create_session_schema, problems
from tests.support.billing_service import RunningBilling


def _user() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


async def test_checkout_creates_a_stripe_session_that_matches_stripes_spec(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    user = _user()
    created = await start_checkout(billing, user, "pro")
    session = fake_stripe.stripe.sessions[created["session_id"]]
    assert created["url"] == session["url"] and created["url"].startswith("https://checkout.stripe.com/")

    request = next(
        r for r in fake_stripe.stripe.created_sessions() if r.params.get("client_reference_id") == user
    )
    assert problems(request.params, create_session_schema()) == []
    params = request.params
    purchase_id = created["purchase_id"]
    assert params["mode"] == "payment"
    assert params["line_items"] == [
        {
            "price_data": {
                "currency": "usd",
                "unit_amount": "3000",
                "product_data": {"name": "Pro", "description": "1200 credits"},
            },
            "quantity": "1",
        }
    ]
    metadata = {"user_id": user, "pack": "pro", "purchase_id": purchase_id}
    assert params["metadata"] == metadata
    assert params["payment_intent_data"] == {"metadata": metadata}
    assert params["success_url"] == "http://127.0.0.1:8000/?checkout=success"
    assert params["cancel_url"] == "http://127.0.0.1:8000/?checkout=cancel"
    assert request.headers["idempotency-key"] == f"checkout-session-{purchase_id}"
    assert request.headers["stripe-version"] == STRIPE_API_VERSION
    assert request.headers["content-type"].startswith("application/x-www-form-urlencoded")

    rows = await sql(
        billing.settings.database_url, "SELECT * FROM purchases WHERE purchase_id = $1", purchase_id
    )
    assert len(rows) == 1
    row = rows[0]
    assert (row["user_id"], row["pack"], row["credits"], row["amount_cents"], row["status"]) == (
        user,
        "pro",
        1200,
        3000,
        "pending",
    )
    assert row["stripe_checkout_session_id"] == created["session_id"]


async def test_checkout_accepts_own_return_urls(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    user = _user()
    await start_checkout(
        billing, user, "starter", success_url="https://app.example/ok", cancel_url="https://app.example/no"
    )
    request = next(
        r for r in fake_stripe.stripe.created_sessions() if r.params.get("client_reference_id") == user
    )
    assert request.params["success_url"] == "https://app.example/ok"
    assert request.params["cancel_url"] == "https://app.example/no"
    assert request.params["line_items"][0]["price_data"]["unit_amount"] == "500"


async def test_checkout_rejections_use_the_envelope_and_record_nothing(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    user = _user()
    before = len(fake_stripe.stripe.requests)
    async with billing.client() as client:
        auth = billing.internal_headers()
        unknown = await client.post(
            "/v1/checkout/sessions", json={"user_id": user, "pack": "gold"}, headers=auth
        )
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "not_found" and "gold" in unknown.json()["error"]["message"]

        for body in (
            {"pack": "pro"},
            {"user_id": "", "pack": "pro"},
            {"user_id": user, "pack": "pro", "success_url": "javascript:x"},
        ):
            bad = await client.post("/v1/checkout/sessions", json=body, headers=auth)
            assert bad.status_code == 422
            assert bad.json()["error"]["code"] == "invalid_request"
        not_json = await client.post(
            "/v1/checkout/sessions", content=b"{", headers={**auth, "content-type": "application/json"}
        )
        assert not_json.status_code == 422 and set(not_json.json()) == {"error"}

        anonymous = await client.post("/v1/checkout/sessions", json={"user_id": user, "pack": "pro"})
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "unauthorized"
    assert len(fake_stripe.stripe.requests) == before
    assert await sql(billing.settings.database_url, "SELECT 1 FROM purchases WHERE user_id = $1", user) == []


async def test_stripe_failure_is_502_and_records_nothing(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    user = _user()
    fake_stripe.stripe.fail_with = 500
    try:
        async with billing.client() as client:
            response = await client.post(
                "/v1/checkout/sessions",
                json={"user_id": user, "pack": "pro"},
                headers=billing.internal_headers(),
            )
    finally:
        fake_stripe.stripe.fail_with = None
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
    attempts = [
        r for r in fake_stripe.stripe.created_sessions() if r.params.get("client_reference_id") == user
    ]
    # The SDK retried with the same idempotency key, so a late success could never make two sessions.
    assert len(attempts) >= 2 and len({r.headers["idempotency-key"] for r in attempts}) == 1
    assert await sql(billing.settings.database_url, "SELECT 1 FROM purchases WHERE user_id = $1", user) == []


async def test_purchases_endpoint_lists_a_users_purchases(billing: RunningBilling) -> None:
    user = _user()
    first = await start_checkout(billing, user, "starter")
    second = await start_checkout(billing, user, "business")
    async with billing.client() as client:
        response = await client.get(f"/v1/users/{user}/purchases", headers=billing.internal_headers())
        anonymous = await client.get(f"/v1/users/{user}/purchases")
        nobody = await client.get("/v1/users/nobody-at-all/purchases", headers=billing.internal_headers())
    assert anonymous.status_code == 401
    assert nobody.json() == {"data": []}
    data = response.json()["data"]
    assert [p["purchase_id"] for p in data] == [second["purchase_id"], first["purchase_id"]]
    assert {k: data[0][k] for k in ("pack", "credits", "amount_cents", "currency", "status")} == {
        "pack": "business",
        "credits": 5000,
        "amount_cents": 10000,
        "currency": "usd",
        "status": "pending",
    }
    assert set(data[0]) >= {
        "purchase_id",
        "pack",
        "credits",
        "amount_cents",
        "currency",
        "status",
        "created_at",
    }
