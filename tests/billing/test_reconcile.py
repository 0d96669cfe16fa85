"""`python -m services.billing reconcile --since DATE`: paid sessions whose webhook never arrived are
credited through the webhook's domain path, once."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta

from services.billing.reconcile import reconcile
from tests.billing.conftest import Captured, FakeStripeServer, sql
from tests.billing.helpers import deliver, start_checkout
from tests.billing.stripe_spec import list_sessions_parameters, problems
from tests.conftest import eventually
from tests.support.billing_service import RunningBilling
from tests.support.servers import REPO_ROOT


async def test_reconcile_repairs_a_purchase_whose_webhook_never_arrived(
    billing: RunningBilling, fake_stripe: FakeStripeServer, captured: Captured
) -> None:
    stripe = fake_stripe.stripe
    since = datetime.now(UTC) - timedelta(seconds=5)
    user = f"user-{uuid.uuid4().hex[:8]}"
    lost = await start_checkout(billing, user, "standard")
    delivered = await start_checkout(billing, user, "starter")
    unpaid = await start_checkout(billing, user, "pro")
    stripe.mark_paid(lost["session_id"])  # Stripe never tells billing about this one
    await deliver(
        billing, stripe.event("checkout.session.completed", stripe.mark_paid(delivered["session_id"]))
    )
    url = billing.settings.database_url

    lines: list[str] = []
    repairs = await reconcile(billing.settings, since, echo=lines.append)
    # (The fake Stripe is shared with other tests, so only this test's purchases are looked at.)
    mine = {lost["purchase_id"], delivered["purchase_id"], unpaid["purchase_id"]}
    assert [(r.purchase_id, r.outcome) for r in repairs if r.purchase_id in mine] == [
        (lost["purchase_id"], "credited")
    ]
    assert any(lost["session_id"] in line and "credited" in line for line in lines), lines
    statuses = {
        r["purchase_id"]: r["status"]
        for r in await sql(url, "SELECT purchase_id, status FROM purchases WHERE user_id = $1", user)
    }
    assert statuses == {
        lost["purchase_id"]: "paid",
        delivered["purchase_id"]: "paid",
        unpaid["purchase_id"]: "pending",
    }
    await eventually(lambda: captured.of(lost["purchase_id"]), timeout=20)
    assert [m["credits"] for m in captured.of(lost["purchase_id"])] == [500]

    # Listing went through the SDK with created[gte] and auto-paging.
    lists = [r for r in stripe.requests if r.method == "GET" and r.path == "/v1/checkout/sessions"]
    assert lists and lists[-1].params["created"] == {"gte": str(int(since.timestamp()))}
    spec_params = list_sessions_parameters()
    for listed in lists:
        for name, value in listed.params.items():
            if name == "created":
                continue  # a filter Stripe added after the API version of the spec subset (2023-08-16)
            assert name in spec_params, name
            assert problems(value, spec_params[name], name) == []

    # Running it again (or the late webhook arriving) repairs nothing and publishes nothing more.
    assert [
        r for r in await reconcile(billing.settings, since, echo=lines.append) if r.purchase_id in mine
    ] == []
    late = await deliver(
        billing, stripe.event("checkout.session.completed", stripe.sessions[lost["session_id"]])
    )
    assert late.json()["outcome"] == "already_credited"
    await asyncio.sleep(1.5)
    assert len(captured.of(lost["purchase_id"])) == 1


async def test_reconcile_pages_through_many_sessions(
    billing: RunningBilling, fake_stripe: FakeStripeServer
) -> None:
    stripe = fake_stripe.stripe
    since = datetime.now(UTC) - timedelta(seconds=2)
    user = f"user-{uuid.uuid4().hex[:8]}"
    created = [await start_checkout(billing, user, "starter") for _ in range(105)]
    for c in created:
        stripe.mark_paid(c["session_id"])
    repairs = await reconcile(billing.settings, since, echo=lambda _: None)
    assert {r.purchase_id for r in repairs} >= {c["purchase_id"] for c in created}
    rows = await sql(
        billing.settings.database_url,
        "SELECT count(*) AS n FROM purchases WHERE user_id = $1 AND status = 'paid'",
        user,
    )
    assert rows[0]["n"] == 105


async def test_reconcile_command_line(
    billing: RunningBilling, fake_stripe: FakeStripeServer, captured: Captured
) -> None:
    # `captured` binds a queue to billing.#: the relay publishes only what some queue receives.
    stripe = fake_stripe.stripe
    user = f"user-{uuid.uuid4().hex[:8]}"
    lost = await start_checkout(billing, user, "business")
    stripe.mark_paid(lost["session_id"])
    s = billing.settings
    env = {
        **os.environ,
        "DATABASE_URL": s.database_url,
        "RABBITMQ_URL": s.rabbitmq_url,
        "BROKER_NAMESPACE": s.broker_namespace,
        "STRIPE_API_KEY": s.stripe_api_key or "",
        "STRIPE_API_BASE": s.stripe_api_base or "",
        "STRIPE_WEBHOOK_SECRET": s.stripe_webhook_secret or "",
    }
    since = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.billing",
        "reconcile",
        "--since",
        since,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert f"repaired session {lost['session_id']}: purchase {lost['purchase_id']}" in text, text
    # Its own drain, or the running service's relay if that was quicker (then it published 0).
    assert "published" in text and "could not publish" not in text, text
    await eventually(lambda: captured.of(lost["purchase_id"], "billing.pack.purchased"), timeout=20)
    rows = await sql(
        s.database_url, "SELECT status FROM purchases WHERE purchase_id = $1", lost["purchase_id"]
    )
    assert [r["status"] for r in rows] == ["paid"]

    bad = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.billing",
        "reconcile",
        "--since",
        "yesterday",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, bad_err = await asyncio.wait_for(bad.communicate(), timeout=60)
    assert bad.returncode == 2 and b"not an ISO date" in bad_err
