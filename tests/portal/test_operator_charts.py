"""The operator dashboard (credits' /admin/) and the portal's usage chart in headless Chromium, against
the whole stack. What the charts draw is read back from Chart.js and compared with the API's answer
(whose figures tests/credits/test_analytics.py checks one by one). Screenshots go to
test-artifacts/portal/ (dashboard-*, usage-chart-*)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from playwright.async_api import Page, expect
from sqlalchemy.engine import make_url

from shared.events import PackPurchased
from tests.portal.stack import Stack
from tests.portal.test_portal import assert_fits_width, phone_shot

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


async def use(stack: Stack, user: str, credits: int, details: dict[str, Any] | None) -> None:
    """A reservation committed at credits with `details`, as the proxy's settlement sends it."""
    async with httpx.AsyncClient(
        base_url=stack.credits.url, headers=stack.credits.headers, timeout=30
    ) as http:
        r = await http.post("/v1/reservations", json={"user_id": user, "amount": credits})
        assert r.status_code == 201, r.text
        body: dict[str, Any] = {"amount": credits}
        if details is not None:
            body["details"] = details
        r = await http.post(f"/v1/reservations/{r.json()['reservation_id']}/commit", json=body)
        assert r.status_code == 200, r.text


async def move_usage(stack: Stack, user: str, model: str, when: datetime) -> None:
    """Puts the user's usage entries of `model` on another day (the ledger's trigger bypassed)."""
    dsn = make_url(stack.credits.settings.database_url).set(drivername="postgresql")
    conn = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "UPDATE ledger_entries SET created_at = $1 WHERE user_id = $2 AND details ->> 'model' = $3",
                when,
                user,
                model,
            )
    finally:
        await conn.close()


async def chart_data(page: Page, canvas_id: str) -> dict[str, Any]:
    data: dict[str, Any] = await page.evaluate(
        """id => { const c = Chart.getChart(document.getElementById(id));
                   return { labels: c.data.labels, datasets: c.data.datasets.map(d => ({label: d.label, data: d.data})) }; }""",
        canvas_id,
    )
    return data


async def analytics(stack: Stack, **params: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.credits.url, timeout=30) as http:
        r = await http.get("/v1/admin/analytics", params=params, headers=stack.credits.admin_headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_operator_dashboard(page: Page, stack: Stack, shoot: Callable[..., Any]) -> None:
    buyer = f"op-{uuid.uuid4().hex[:8]}"
    await stack.credits.app.state.runtime.purchases.apply_purchase(
        PackPurchased(
            purchase_id=f"pur_{uuid.uuid4().hex[:10]}",
            user_id=buyer,
            pack="standard",
            credits=500,
            unlocks_api=False,
            amount_cents=1500,
            currency="usd",
            stripe_checkout_session_id="cs_dashboard",
        )
    )
    await use(
        stack, buyer, 12, {"operation": "chat.completions", "model": "gpt-4o-mini", "upstream_cost_usd": 0.01}
    )
    await use(
        stack, buyer, 5, {"operation": "images.generations", "model": "dall-e-3", "upstream_cost_usd": 0.04}
    )

    await page.goto(stack.credits.url + "/admin/")
    await expect(page.get_by_test_id("admin-token")).to_be_visible()
    await shoot(page, "dashboard-signin")

    # A wrong token is refused and not kept.
    await page.get_by_test_id("admin-token").fill("not-the-token")
    await page.get_by_test_id("signin-submit").click()
    await expect(page.get_by_test_id("signin-error")).to_contain_text("refused")
    assert await page.evaluate("sessionStorage.length") == 0

    await page.get_by_test_id("admin-token").fill(stack.credits.admin_token)
    await page.get_by_test_id("signin-submit").click()
    await expect(page.locator("body[data-loaded=true]")).to_have_count(1)
    want = await analytics(stack)
    assert want["revenue_cents"] >= 1500 and want["usage_by_model"]["dall-e-3"]["credits"] >= 5
    revenue = f"${want['revenue_cents'] / 100:,.2f}"
    await expect(page.get_by_test_id("kpi-revenue")).to_have_text(revenue)
    await expect(page.get_by_test_id("kpi-packs")).to_have_text(f"{want['packs_sold']:,}")
    await expect(page.get_by_test_id("kpi-used")).to_have_text(f"{want['total_credits_used']:,}")
    # The token lives in this tab's sessionStorage only.
    assert await page.evaluate("sessionStorage.getItem('cp-admin-token')") == stack.credits.admin_token
    assert await page.evaluate("localStorage.length") == 0

    daily = await chart_data(page, "chart-revenue")
    assert daily["labels"] == [d["date"] for d in want["daily"]]
    assert daily["datasets"][0]["data"] == [d["revenue_cents"] / 100 for d in want["daily"]]
    assert daily["datasets"][1]["data"] == pytest.approx([d["upstream_cost_usd"] for d in want["daily"]])
    packs = await chart_data(page, "chart-packs")
    assert packs["datasets"][0]["data"] == [d["packs_sold"] for d in want["daily"]]
    credits = await chart_data(page, "chart-credits")
    assert credits["datasets"][1]["data"] == [d["credits_used"] for d in want["daily"]]
    models = await chart_data(page, "chart-models")
    assert dict(zip(models["labels"], models["datasets"][0]["data"], strict=True)) == {
        m: v["credits"] for m, v in want["usage_by_model"].items()
    }
    operations = await chart_data(page, "chart-operations")
    assert (
        dict(zip(operations["labels"], operations["datasets"][0]["data"], strict=True))
        == want["usage_by_operation"]
    )
    funnel = await chart_data(page, "chart-funnel")
    f = want["funnel"]
    assert funnel["datasets"][0]["data"] == [f["signed_up"], f["bought"], f["bought_again"]]
    margin = await chart_data(page, "chart-margin")
    assert margin["datasets"][0]["data"] == pytest.approx(
        [
            want["revenue_cents"] / 100,
            want["upstream_cost_usd"],
            want["revenue_cents"] / 100 - want["upstream_cost_usd"],
        ]
    )
    economics = await chart_data(page, "chart-packs-economics")
    assert economics["labels"] == [p["pack"] for p in want["packs"]]
    assert economics["datasets"][1]["data"] == pytest.approx([p["upstream_cost_usd"] for p in want["packs"]])
    await expect(page.get_by_test_id("pack-row-standard")).to_contain_text("$15.00")
    await shoot(page, "dashboard")
    await phone_shot(page, shoot, "dashboard")

    # A range before any activity: nothing sold, nothing drawn.
    await page.get_by_test_id("range-from").fill("2020-01-01")
    await page.get_by_test_id("range-to").fill("2020-01-31")
    await page.get_by_test_id("range-apply").click()
    await expect(page.get_by_test_id("kpi-revenue")).to_have_text("$0.00")
    assert (await chart_data(page, "chart-revenue"))["labels"] == []
    assert (await chart_data(page, "chart-models"))["labels"] == []
    # A reversed range is refused with the API's message, and the figures stay.
    await page.get_by_test_id("range-from").fill("2020-02-01")
    await page.get_by_test_id("range-apply").click()
    await expect(page.get_by_test_id("range-error")).to_contain_text("from must not be after to")

    # The session survives a reload; signing out forgets the token.
    await page.get_by_test_id("preset-all").click()
    await page.reload()
    await expect(page.get_by_test_id("kpi-revenue")).to_have_text(revenue)
    await page.get_by_test_id("signout").click()
    await expect(page.get_by_test_id("admin-token")).to_be_visible()
    assert await page.evaluate("sessionStorage.length") == 0


async def test_portal_usage_chart_by_day_and_model(
    page: Page,
    stack: Stack,
    sign_in_url: Callable[..., str],
    new_user: Callable[[], str],
    shoot: Callable[..., Any],
) -> None:
    user = new_user()
    await page.goto(sign_in_url(user))
    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    await use(
        stack, user, 5, {"operation": "images.generations", "model": "dall-e-3", "upstream_cost_usd": 0.04}
    )
    await use(stack, user, 3, {"operation": "chat.completions", "model": "gpt-4o"})
    await stack.spend_all(user)  # the last 2 through the gateway
    three_days_ago = datetime.now(UTC) - timedelta(days=3)
    await move_usage(stack, user, "dall-e-3", three_days_ago)

    # Expected: the user's usage entries summed per UTC day and model, from the credits service.
    expected: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for entry in await stack.ledger(user):
        if entry["type"] == "usage":
            details = entry["details"] or {}
            label = details.get("model") or details.get("operation") or "other"
            expected[label][entry["created_at"][:10]] += -entry["amount"]
    days = sorted({d for per_day in expected.values() for d in per_day})
    assert days == [three_days_ago.date().isoformat(), datetime.now(UTC).date().isoformat()]

    await page.get_by_test_id("tab-history").click()
    await expect(page.locator("#usage-card[data-loaded=true]")).to_have_count(1)
    drawn = await chart_data(page, "usage-chart")
    assert drawn["labels"] == days
    assert {d["label"]: dict(zip(days, d["data"], strict=True)) for d in drawn["datasets"]} == {
        label: {day: per_day.get(day, 0) for day in days} for label, per_day in expected.items()
    }
    assert {d["label"] for d in drawn["datasets"]} >= {"dall-e-3", "gpt-4o"}
    await expect(page.get_by_test_id("usage-empty")).to_be_hidden()
    await shoot(page, "usage-chart")
    await phone_shot(page, shoot, "usage-chart")
    await assert_fits_width(page)


async def test_portal_usage_chart_empty(
    page: Page, stack: Stack, sign_in_url: Callable[..., str], new_user: Callable[[], str]
) -> None:
    await page.goto(sign_in_url(new_user()))
    await expect(page.get_by_test_id("balance")).to_have_text("10 credits")
    await page.get_by_test_id("tab-history").click()
    await expect(page.locator("#usage-card[data-loaded=true]")).to_have_count(1)
    await expect(page.get_by_test_id("usage-empty")).to_be_visible()
