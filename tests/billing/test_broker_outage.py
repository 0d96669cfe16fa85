"""The broker is unreachable when Stripe calls: billing answers 2xx, keeps the purchase and the message,
reports the broker as failing on /readyz, and delivers the message once the broker is reachable."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from tests.billing.conftest import Captured, FakeStripeServer, sql
from tests.billing.helpers import deliver, start_checkout
from tests.conftest import eventually
from tests.support.billing_service import RunningBilling, running_billing
from tests.support.servers import free_port


@pytest.fixture
async def billing_without_broker(
    fake_stripe: FakeStripeServer, make_database_url: Callable[[str], str], broker_namespace: str
) -> AsyncIterator[RunningBilling]:
    # Nothing listens on this port: every connection attempt is refused.
    async with running_billing(
        database_url=make_database_url("billing_outage"),
        rabbitmq_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        broker_namespace=broker_namespace,
        stripe_api_base=fake_stripe.url,
        stripe_api_key=fake_stripe.stripe.api_key,
    ) as running:
        yield running


async def test_webhook_during_a_broker_outage_is_delivered_when_the_broker_returns(
    billing_without_broker: RunningBilling,
    fake_stripe: FakeStripeServer,
    captured: Captured,
    rabbitmq_url: str,
) -> None:
    billing = billing_without_broker
    stripe = fake_stripe.stripe
    async with billing.client() as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["broker"].startswith("failing")
        assert ready.json()["checks"]["database"] == "ok"

    created = await start_checkout(billing, f"user-{uuid.uuid4().hex[:8]}", "pro")
    purchase_id = created["purchase_id"]
    session = stripe.mark_paid(created["session_id"])
    response = await deliver(billing, stripe.event("checkout.session.completed", session))
    assert response.status_code == 200 and response.json()["outcome"] == "credited"

    url = billing.settings.database_url
    assert [
        r["status"]
        for r in await sql(url, "SELECT status FROM purchases WHERE purchase_id = $1", purchase_id)
    ] == ["paid"]
    pending = await sql(
        url, "SELECT sent_at, attempts FROM outbox WHERE body->>'purchase_id' = $1", purchase_id
    )
    assert len(pending) == 1 and pending[0]["sent_at"] is None

    # The relay keeps retrying meanwhile (the webhook woke it); the row stays pending.
    await asyncio.sleep(2)
    assert "Connect" in (billing.runtime.relay.last_error or "")
    still = await sql(url, "SELECT sent_at FROM outbox WHERE body->>'purchase_id' = $1", purchase_id)
    assert still[0]["sent_at"] is None
    async with billing.client() as client:
        metrics = (await client.get("/metrics")).text
    # (The gauges are process-wide and other billing instances run in this test process, so the
    # figures are read from the relay; /metrics must carry the series.)
    assert "outbox_pending_messages{" in metrics and "outbox_oldest_pending_age_seconds{" in metrics
    count, age = await billing.runtime.relay.pending()
    assert count == 1 and age >= 1.5
    assert captured.of(purchase_id) == []

    # The broker comes back.
    billing.runtime.relay.set_broker_url(rabbitmq_url)
    await eventually(lambda: captured.of(purchase_id), timeout=30)
    sent = await sql(url, "SELECT sent_at FROM outbox WHERE body->>'purchase_id' = $1", purchase_id)
    await eventually(lambda: sql(url, "SELECT 1 FROM outbox WHERE sent_at IS NOT NULL"), timeout=10)
    assert len(sent) == 1
    assert [m["credits"] for m in captured.of(purchase_id)] == [1200]
    async with billing.client() as client:
        assert (await client.get("/readyz")).status_code == 200
