"""The whole purchase path with the real credits service: Stripe webhook → billing (inbox, purchase,
outbox) → RabbitMQ → credits consumer → balance, and refunds clawing credits back.

This module runs its own billing and credits on a separate broker namespace, so the credits
consumer here never sees the other billing tests' messages (nor do other packages' credits)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.billing.conftest import FakeStripeServer
from tests.billing.helpers import deliver, start_checkout
from tests.conftest import eventually
from tests.support.billing_service import RunningBilling, running_billing
from tests.support.broker import delete_namespace
from tests.support.credits_service import CreditsService, running_credits


@dataclass
class System:
    billing: RunningBilling
    credits: CreditsService


@pytest.fixture(scope="module")
async def system(
    fake_stripe: FakeStripeServer,
    make_database_url: Callable[[str], str],
    rabbitmq_url: str,
    redis_url: str,
    broker_namespace: str,
) -> AsyncIterator[System]:
    namespace = f"{broker_namespace}-e2e"
    async with (
        running_credits(
            database_url=make_database_url("credits_billing_e2e"),
            redis_url=redis_url,
            broker_namespace=namespace,
        ) as credits,
        running_billing(
            database_url=make_database_url("billing_e2e"),
            rabbitmq_url=rabbitmq_url,
            broker_namespace=namespace,
            stripe_api_base=fake_stripe.url,
            stripe_api_key=fake_stripe.stripe.api_key,
        ) as billing,
    ):
        yield System(billing, credits)
    await delete_namespace(rabbitmq_url, namespace)


async def _account(system: System, user: str) -> dict[str, Any] | None:
    async with httpx.AsyncClient(base_url=system.credits.url, timeout=30) as client:
        response = await client.get(f"/v1/users/{user}/credits", headers=system.credits.headers)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    account: dict[str, Any] = response.json()
    return account


async def _ledger(system: System, user: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=system.credits.url, timeout=30) as client:
        response = await client.get(
            f"/v1/users/{user}/transactions?limit=100", headers=system.credits.headers
        )
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["data"]
    return entries


async def _balance_becomes(system: System, user: str, expected: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        account = await _account(system, user)
        return account if account is not None and account["credits_remaining"] == expected else None

    account = await eventually(check, timeout=30, interval=0.2)
    assert isinstance(account, dict)
    return account


async def test_paid_checkout_delivered_repeatedly_credits_once_and_refunds_claw_back(
    system: System, fake_stripe: FakeStripeServer
) -> None:
    stripe = fake_stripe.stripe
    billing = system.billing
    user = f"user-{uuid.uuid4().hex[:8]}"
    created = await start_checkout(billing, user, "pro")
    purchase_id = created["purchase_id"]
    session = stripe.mark_paid(created["session_id"])
    completed = stripe.event("checkout.session.completed", session)

    async with billing.client() as client:
        for _ in range(5):
            assert (await deliver(billing, completed, client=client)).status_code == 200
        copies = [completed] * 5 + [
            stripe.event("checkout.session.async_payment_succeeded", session) for _ in range(5)
        ]
        responses = await asyncio.gather(*(deliver(billing, e, client=client) for e in copies))
    assert all(r.status_code == 200 for r in responses)

    # The account did not exist: credits creates it (signup bonus) and applies the pack once.
    account = await _balance_becomes(system, user, 10 + 1200)
    assert account["api_access_unlocked"] is True
    assert account["credits_purchased_total"] == 1200 and account["tier"] == "pro"
    await asyncio.sleep(2)  # any duplicate would land by now
    assert (await _account(system, user) or {})["credits_remaining"] == 1210
    purchases = [e for e in await _ledger(system, user) if e["type"] == "purchase"]
    assert [e["amount"] for e in purchases] == [1200]
    assert purchase_id in purchases[0]["reference"]

    # A third of the price refunded: 400 credits clawed back, the API unlock stays.
    partial = stripe.event("charge.refunded", stripe.refund(created["session_id"], 1000))
    for _ in range(3):
        assert (await deliver(billing, partial)).status_code == 200
    account = await _balance_becomes(system, user, 1210 - 400)
    assert account["api_access_unlocked"] is True

    # The rest refunded: the cumulative figure is 1200, credits takes back the 800 not yet taken.
    full = stripe.event("charge.refunded", stripe.refund(created["session_id"]))
    assert (await deliver(billing, full)).status_code == 200
    account = await _balance_becomes(system, user, 10)
    assert account["api_access_unlocked"] is True
    await asyncio.sleep(1.5)
    clawbacks = [e["amount"] for e in await _ledger(system, user) if e["type"] == "refund_clawback"]
    assert sorted(clawbacks) == [-800, -400]
    assert (await _account(system, user) or {})["credits_remaining"] == 10


async def test_existing_account_is_credited_once(system: System, fake_stripe: FakeStripeServer) -> None:
    stripe = fake_stripe.stripe
    user = f"user-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=system.credits.url, timeout=30) as client:
        made = await client.post("/v1/users", json={"user_id": user}, headers=system.credits.headers)
        assert made.status_code == 201
    created = await start_checkout(system.billing, user, "standard")
    session = stripe.mark_paid(created["session_id"])
    await asyncio.gather(
        *(deliver(system.billing, stripe.event("checkout.session.completed", session)) for _ in range(5))
    )
    account = await _balance_becomes(system, user, 10 + 500)
    assert account["api_access_unlocked"] is False and account["support_tier"] == "Email (48h response)"
    await asyncio.sleep(1.5)
    assert (await _account(system, user) or {})["credits_remaining"] == 510
