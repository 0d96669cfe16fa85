"""Small steps the billing tests share: start a checkout, deliver a signed webhook."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.billing_service import WEBHOOK_SECRET, RunningBilling
from tests.support.stripe_server import FakeStripe


async def start_checkout(
    billing: RunningBilling, user_id: str, pack: str = "pro", **extra: Any
) -> dict[str, Any]:
    async with billing.client() as client:
        response = await client.post(
            "/v1/checkout/sessions",
            json={"user_id": user_id, "pack": pack, **extra},
            headers=billing.internal_headers(),
        )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def deliver(
    billing: RunningBilling,
    event: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
    client: httpx.AsyncClient | None = None,
) -> httpx.Response:
    payload, headers = FakeStripe.signed(event, secret, timestamp=timestamp)
    if client is not None:
        return await client.post("/v1/webhooks/stripe", content=payload, headers=headers)
    async with billing.client() as own:
        return await own.post("/v1/webhooks/stripe", content=payload, headers=headers)
