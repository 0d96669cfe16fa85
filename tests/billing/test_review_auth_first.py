"""docs/api.md, Conventions: internal endpoints take the internal token; a caller without it (or with a wrong one)
gets 401 whatever its body, so an anonymous caller learns nothing about the endpoint's input rules
(before: a malformed JSON body was answered 422, validated before the token was looked at)."""

from __future__ import annotations

import uuid

from tests.billing.conftest import FakeStripeServer, sql
from tests.support.billing_service import RunningBilling


async def test_checkout_without_a_valid_token_is_401_whatever_the_body(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    user = f"user-{uuid.uuid4().hex[:8]}"
    before = len(fake_stripe.stripe.requests)
    bodies = [b"{", b"[]", b'{"pack": "pro"}', b'{"user_id": 5, "pack": "pro"}', b"\xff\xfe"]
    async with billing.client() as client:
        for headers in ({}, {"Authorization": "Bearer not-the-internal-token"}):
            for body in bodies:
                response = await client.post(
                    "/v1/checkout/sessions",
                    content=body,
                    headers={**headers, "content-type": "application/json"},
                )
                assert response.status_code == 401, (headers, body, response.text)
                assert response.json()["error"]["code"] == "unauthorized"
        # With the token, the same bodies are validation errors in the envelope.
        for body in bodies:
            response = await client.post(
                "/v1/checkout/sessions",
                content=body,
                headers={**billing.internal_headers(), "content-type": "application/json"},
            )
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error"]["code"] == "invalid_request"
        # And a good body with the token still works.
        ok = await client.post(
            "/v1/checkout/sessions",
            json={"user_id": user, "pack": "starter"},
            headers=billing.internal_headers(),
        )
        assert ok.status_code == 201, ok.text
    assert len(fake_stripe.stripe.created_sessions()) >= 1
    assert len([r for r in fake_stripe.stripe.requests[before:] if r.path == "/v1/checkout/sessions"]) == 1
    rows = await sql(billing.settings.database_url, "SELECT pack FROM purchases WHERE user_id = $1", user)
    assert [r["pack"] for r in rows] == ["starter"]
