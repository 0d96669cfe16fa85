"""Operator analytics (docs/api.md, Credits "Operator insight") against a real credits service with known
purchases, a refund and usage with `details`, over ranges that include and exclude them.

The service writes its own timestamps (PostgreSQL's clock). To put the activity on known days, each
phase below runs through the real service (HTTP commits, billing's messages over RabbitMQ) and the
test then moves that phase's rows to a fixed instant of a past day (the ledger's append-only trigger is
bypassed for that update only). The last phase stays today, so the answer mixes whole days rolled up
into `ledger_daily` and today's entries read from the ledger itself.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg
import httpx
import orjson
import pytest
from sqlalchemy.engine import make_url

from shared.broker import Topology, declare_topology, event_message
from shared.events import Event, PackPurchased, PackRefunded
from tests.conftest import eventually
from tests.credits.helpers import assert_envelope
from tests.support.broker import delete_namespace
from tests.support.credits_service import CreditsService, running_credits

DAY_A = datetime(2026, 11, 2, 12, 0, tzinfo=UTC)
DAY_B = datetime(2026, 11, 5, 12, 0, tzinfo=UTC)


class World:
    """A credits service of its own (own database and broker names), so every total is known."""

    def __init__(self, service: CreditsService, http: httpx.AsyncClient, pg: asyncpg.Pool, exchange: Any):
        self.service, self.http, self.pg, self.exchange = service, http, pg, exchange

    async def publish(self, event: Event) -> None:
        await self.exchange.publish(event_message(event), routing_key=event.routing_key)

    async def buy(self, user: str, pack: str, credits: int, cents: int) -> str:
        purchase_id = f"pur_{uuid.uuid4().hex[:10]}"
        await self.publish(
            PackPurchased(
                purchase_id=purchase_id,
                user_id=user,
                pack=pack,
                credits=credits,
                unlocks_api=pack == "pro",
                amount_cents=cents,
                currency="usd",
                stripe_checkout_session_id=f"cs_{purchase_id}",
            )
        )

        async def applied() -> bool:
            row = await self.pg.fetchrow("SELECT 1 FROM purchases WHERE purchase_id = $1", purchase_id)
            return row is not None

        await eventually(applied, timeout=30)
        return purchase_id

    async def refund(self, user: str, purchase_id: str, pack: str, credits: int, cents: int) -> None:
        await self.publish(
            PackRefunded(
                purchase_id=purchase_id,
                user_id=user,
                pack=pack,
                credits=credits,
                amount_cents=cents,
                currency="usd",
            )
        )

        async def applied() -> bool:
            row = await self.pg.fetchrow(
                "SELECT refunded_credits FROM purchases WHERE purchase_id = $1", purchase_id
            )
            return row is not None and row["refunded_credits"] == credits

        await eventually(applied, timeout=30)

    async def reserve(self, user: str, amount: int) -> str:
        r = await self.http.post("/v1/reservations", json={"user_id": user, "amount": amount})
        assert r.status_code == 201, r.text
        return str(r.json()["reservation_id"])

    async def use(
        self, user: str, amount: int, details: dict[str, Any] | None, *, batch: bool = False
    ) -> None:
        rid = await self.reserve(user, amount)
        body: dict[str, Any] = {"amount": amount}
        if details is not None:
            body["details"] = details
        if batch:
            r = await self.http.post(
                "/v1/reservations/batch",
                json={"items": [{"reservation_id": rid, "action": "commit", **body}]},
            )
            assert r.status_code == 200 and r.json()["results"][0]["status"] == 200, r.text
        else:
            r = await self.http.post(f"/v1/reservations/{rid}/commit", json=body)
            assert r.status_code == 200 and r.json()["charged"] == amount, r.text

    async def move_recent_rows_to(self, when: datetime) -> None:
        """Everything written in the last hour now carries `when` (the ledger's trigger bypassed)."""
        async with self.pg.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            for table, column in (
                ("accounts", "created_at"),
                ("ledger_entries", "created_at"),
                ("purchases", "applied_at"),
                ("purchase_refunds", "refunded_at"),
            ):
                await conn.execute(
                    f"UPDATE {table} SET {column} = $1 WHERE {column} > now() - interval '1 hour'", when
                )
            # The sweeper may have summed the (then empty) past days already: sum them again.
            await conn.execute("DELETE FROM ledger_daily")
            await conn.execute("UPDATE ledger_daily_state SET rolled_through = NULL")

    async def analytics(self, **params: str) -> dict[str, Any]:
        r = await self.http.get("/v1/admin/analytics", params=params, headers=self.service.admin_headers)
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture(scope="module")
async def world(
    make_database_url: Callable[[str], str],
    redis_url: str,
    broker_namespace: str,
    rabbitmq_url: str,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> AsyncIterator[World]:
    namespace = f"{broker_namespace}-analytics"
    database_url = make_database_url("credits_analytics")
    try:
        async with running_credits(
            database_url=database_url, redis_url=redis_url, broker_namespace=namespace, signup_credits=10
        ) as service:
            dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
            pg = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
            channel = await amqp_connection.channel(publisher_confirms=True)
            exchange = await declare_topology(channel, Topology(namespace))
            async with httpx.AsyncClient(base_url=service.url, headers=service.headers, timeout=60) as http:
                yield World(service, http, pg, exchange)
            await channel.close()
            await pg.close()
    finally:
        await delete_namespace(rabbitmq_url, namespace)


CHAT = {
    "operation": "chat.completions",
    "model": "gpt-4o-mini",
    "input_tokens": 120,
    "output_tokens": 40,
    "upstream_cost_usd": 0.012,
}
IMAGE = {"operation": "images.generations", "model": "dall-e-3", "upstream_cost_usd": 0.04}
EMBED = {"operation": "embeddings", "model": "text-embedding-3-small", "input_tokens": 500}
CHAT_TODAY = {"operation": "chat.completions", "model": "gpt-4o", "upstream_cost_usd": 0.001}


@pytest.fixture(scope="module")
async def history(world: World) -> dict[str, str]:
    """Day A: alice signs up, buys starter ($5, 100), uses 30 (chat), 5 (image, via the batch) and 2
    (no details). Day B: alice buys standard ($15, 500); bob buys pro ($30, 1200) and gets half of it
    refunded ($15, 600 credits); carol signs up; bob uses 10 (embeddings, no upstream price). Today:
    carol uses 3 (chat on gpt-4o)."""
    alice, bob, carol = (f"{n}-{uuid.uuid4().hex[:6]}" for n in ("alice", "bob", "carol"))
    assert (await world.http.post("/v1/users", json={"user_id": alice})).status_code == 201
    await world.buy(alice, "starter", 100, 500)
    await world.use(alice, 30, CHAT)
    await world.use(alice, 5, IMAGE, batch=True)
    await world.use(alice, 2, None)
    await world.move_recent_rows_to(DAY_A)

    await world.buy(alice, "standard", 500, 1500)
    pro = await world.buy(bob, "pro", 1200, 3000)
    assert (await world.http.post("/v1/users", json={"user_id": carol})).status_code == 201
    await world.use(bob, 10, EMBED)
    await world.refund(bob, pro, "pro", 600, 1500)
    await world.move_recent_rows_to(DAY_B)

    await world.use(carol, 3, CHAT_TODAY)
    return {"alice": alice, "bob": bob, "carol": carol}


def model(requests: int, credits: int, cost: float | None) -> dict[str, Any]:
    return {"requests": requests, "credits": credits, "upstream_cost_usd": cost}


def same(got: Any, want: Any) -> bool:
    """Equal, floats to 1e-9 (sums of decimal costs), through nested dicts and lists."""
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same, got, want))
    return type(got) is type(want) and bool(got == want)


def assert_report(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Every field."""
    assert set(got) == set(want), set(got) ^ set(want)
    for key, value in want.items():
        assert same(got[key], value), f"{key}: got {got[key]!r}, want {value!r}"


def day(date: str, **values: Any) -> dict[str, Any]:
    row = {
        "date": date,
        "new_users": 0,
        "paying_users": 0,
        "revenue_cents": 0,
        "packs_sold": 0,
        "credits_purchased": 0,
        "credits_used": 0,
        "upstream_cost_usd": 0.0,
    }
    return {**row, **values}


def pack(
    name: str, price: int, credits: int, sold: int, revenue: int, refunded: int, per_credit: float | None
):
    cost = credits * per_credit if per_credit is not None else None
    return {
        "pack": name,
        "price_cents": price,
        "credits": credits,
        "packs_sold": sold,
        "revenue_cents": revenue,
        "refunded_cents": refunded,
        "upstream_cost_usd": cost,
        "margin": (price / 100 - cost) / (price / 100) if cost is not None else None,
    }


async def test_all_time(world: World, history: dict[str, str]) -> None:
    today = datetime.now(UTC).date().isoformat()
    per_credit = 0.053 / 38  # the cost of the 38 credits whose upstream cost is known
    want = {
        "from": None,
        "to": None,
        "total_users": 3,
        "paying_users": 2,
        "conversion_rate": 2 / 3,
        "tier_breakdown": {"free": 1, "standard": 1, "pro": 1},
        # Net of refunds: half of the pro pack went back.
        "revenue_by_pack_cents": {"starter": 500, "standard": 1500, "pro": 1500},
        "total_credits_purchased": 1800,
        "total_credits_used": 50,
        "total_credits_remaining": (10 + 100 - 37 + 500) + (10 + 1200 - 10 - 600) + (10 - 3),
        "revenue_cents": 3500,
        "packs_sold": 3,
        "average_pack_cents": 1167,  # 3500 / 3, rounded
        "lifetime_value_cents": 1750,
        "repeat_purchase_rate": 0.5,
        "median_days_between_purchases": 3.0,
        "credit_utilization": 50 / 1830,  # 30 signup credits + 1800 bought
        "credits_granted_or_bought": 1830,
        "usage_by_operation": {
            "chat.completions": 33,
            "images.generations": 5,
            "embeddings": 10,
            "unknown": 2,
        },
        "usage_by_model": {
            "gpt-4o-mini": model(1, 30, 0.012),
            "dall-e-3": model(1, 5, 0.04),
            "unknown": model(1, 2, None),
            "text-embedding-3-small": model(1, 10, None),
            "gpt-4o": model(1, 3, 0.001),
        },
        "upstream_cost_usd": 0.053,
        "upstream_cost_per_credit_usd": per_credit,
        "gross_margin": (35.0 - 0.053) / 35.0,
        "funnel": {"signed_up": 3, "bought": 2, "bought_again": 1},
        "packs": [
            pack("starter", 500, 100, 1, 500, 0, per_credit),
            pack("standard", 1500, 500, 1, 1500, 0, per_credit),
            pack("pro", 3000, 1200, 1, 1500, 1500, per_credit),
        ],
        "daily": [
            day(
                "2026-11-02",
                new_users=1,
                paying_users=1,
                revenue_cents=500,
                packs_sold=1,
                credits_purchased=100,
                credits_used=37,
                upstream_cost_usd=0.052,
            ),
            day(
                "2026-11-05",
                new_users=2,
                paying_users=2,
                revenue_cents=3000,
                packs_sold=2,
                credits_purchased=1700,
                credits_used=10,
            ),
            day(today, credits_used=3, upstream_cost_usd=0.001),
        ],
    }
    first = await world.analytics()
    assert_report(first, want)
    # Asked again (days now rolled up): the same answer.
    assert_report(await world.analytics(), want)
    # A range covering everything says the same.
    assert_report(
        await world.analytics(**{"from": "2026-11-01", "to": today}),
        {**want, "from": "2026-11-01", "to": today},
    )


async def test_one_day_with_a_purchase_before_it(world: World, history: dict[str, str]) -> None:
    got = await world.analytics(**{"from": "2026-11-05", "to": "2026-11-05"})
    assert_report(
        got,
        {
            "from": "2026-11-05",
            "to": "2026-11-05",
            "total_users": 3,  # every account exists by the end of the day
            "paying_users": 2,
            "conversion_rate": 2 / 3,
            "tier_breakdown": {"free": 1, "standard": 1, "pro": 1},
            "revenue_by_pack_cents": {"standard": 1500, "pro": 1500},
            "total_credits_purchased": 1700,
            "total_credits_used": 10,
            "total_credits_remaining": 1180,
            "revenue_cents": 3000,
            "packs_sold": 2,
            "average_pack_cents": 1500,
            "lifetime_value_cents": 1500,
            "repeat_purchase_rate": 0.0,
            # alice's purchase that day follows her purchase of day A, outside the range.
            "median_days_between_purchases": 3.0,
            "credit_utilization": 10 / 1720,  # bob's and carol's signup credits + 1700 bought
            "credits_granted_or_bought": 1720,
            "usage_by_operation": {"embeddings": 10},
            "usage_by_model": {"text-embedding-3-small": model(1, 10, None)},
            "upstream_cost_usd": 0.0,
            "upstream_cost_per_credit_usd": None,
            "gross_margin": 1.0,
            "funnel": {"signed_up": 2, "bought": 1, "bought_again": 0},
            "packs": [
                pack("standard", 1500, 500, 1, 1500, 0, None),
                pack("pro", 3000, 1200, 1, 1500, 1500, None),
            ],
            "daily": [
                day(
                    "2026-11-05",
                    new_users=2,
                    paying_users=2,
                    revenue_cents=3000,
                    packs_sold=2,
                    credits_purchased=1700,
                    credits_used=10,
                )
            ],
        },
    )


EMPTY = {
    "paying_users": 0,
    "conversion_rate": 0.0,
    "revenue_by_pack_cents": {},
    "total_credits_purchased": 0,
    "total_credits_used": 0,
    "revenue_cents": 0,
    "packs_sold": 0,
    "average_pack_cents": 0,
    "lifetime_value_cents": 0,
    "repeat_purchase_rate": 0.0,
    "median_days_between_purchases": None,
    "credit_utilization": 0.0,
    "credits_granted_or_bought": 0,
    "usage_by_operation": {},
    "usage_by_model": {},
    "upstream_cost_usd": 0.0,
    "upstream_cost_per_credit_usd": None,
    "gross_margin": None,
    "funnel": {"signed_up": 0, "bought": 0, "bought_again": 0},
    "packs": [],
    "daily": [],
}


async def test_ranges_that_exclude_the_activity(world: World, history: dict[str, str]) -> None:
    between = await world.analytics(**{"from": "2026-11-03", "to": "2026-11-04"})
    assert_report(
        between,
        {
            **EMPTY,
            "from": "2026-11-03",
            "to": "2026-11-04",
            "total_users": 1,  # alice, by her current tier and balance
            "tier_breakdown": {"free": 0, "standard": 1},
            "total_credits_remaining": 573,
        },
    )
    before = await world.analytics(**{"from": "2026-10-01", "to": "2026-10-31"})
    assert_report(
        before,
        {
            **EMPTY,
            "from": "2026-10-01",
            "to": "2026-10-31",
            "total_users": 0,
            "tier_breakdown": {"free": 0},
            "total_credits_remaining": 0,
        },
    )


@pytest.mark.parametrize(
    "params",
    [
        {"from": "2026-13-01"},
        {"to": "yesterday"},
        {"from": "2026-11-05T00:00:00Z"},
        {"from": "2026-11-06", "to": "2026-11-05"},
    ],
)
async def test_bad_dates_are_400(world: World, params: dict[str, str]) -> None:
    r = await world.http.get("/v1/admin/analytics", params=params, headers=world.service.admin_headers)
    assert_envelope(r, 400, "invalid_request")


async def test_transactions_carry_details(world: World, history: dict[str, str]) -> None:
    r = await world.http.get(f"/v1/users/{history['alice']}/transactions")
    assert r.status_code == 200, r.text
    entries = list(reversed(r.json()["data"]))
    full = {"model": None, "input_tokens": None, "output_tokens": None, "upstream_cost_usd": None}
    assert [(e["type"], e["amount"], e["details"]) for e in entries] == [
        ("signup_bonus", 10, None),
        ("purchase", 100, None),
        ("usage", -30, CHAT),
        ("usage", -5, {**full, **IMAGE}),
        ("usage", -2, None),  # committed without details
        ("purchase", 500, None),
    ]


@pytest.mark.parametrize(
    "details",
    [
        {"model": "gpt-4o"},  # no operation
        {"operation": 5},
        {"operation": "chat.completions", "model": "gpt\u0000"},
        {"operation": "x" * 201},
        {"operation": "chat.completions", "input_tokens": -1},
        {"operation": "chat.completions", "output_tokens": "12"},
        {"operation": "chat.completions", "upstream_cost_usd": -0.5},
        {"operation": "chat.completions", "upstream_cost_usd": "0.1"},
        "chat",
    ],
)
async def test_bad_details_are_refused_and_change_nothing(world: World, details: Any) -> None:
    user = f"d-{uuid.uuid4().hex[:8]}"
    assert (await world.http.post("/v1/users", json={"user_id": user})).status_code == 201
    rid = await world.reserve(user, 4)
    single = await world.http.post(f"/v1/reservations/{rid}/commit", json={"amount": 3, "details": details})
    assert_envelope(single, 422, "invalid_request")
    batch = await world.http.post(
        "/v1/reservations/batch",
        json={"items": [{"reservation_id": rid, "action": "commit", "amount": 3, "details": details}]},
    )
    assert batch.status_code == 200, batch.text
    [result] = batch.json()["results"]  # refused on its own: the batch's other items would apply
    assert (result["reservation_id"], result["status"]) == (rid, 422), result
    assert result["error"]["code"] == "invalid_request", result
    hold = await world.pg.fetchrow("SELECT status, charged FROM reservations WHERE id = $1::uuid", rid)
    assert (hold["status"], hold["charged"]) == ("held", None)
    ledger = await world.pg.fetch("SELECT type FROM ledger_entries WHERE user_id = $1", user)
    assert [e["type"] for e in ledger] == ["signup_bonus"]


async def test_unknown_detail_keys_are_dropped(world: World) -> None:
    user = f"d-{uuid.uuid4().hex[:8]}"
    assert (await world.http.post("/v1/users", json={"user_id": user})).status_code == 201
    await world.use(user, 2, {"operation": "embeddings", "extra": "x" * 5000})
    stored = await world.pg.fetchval(
        "SELECT details FROM ledger_entries WHERE user_id = $1 AND type = 'usage'", user
    )
    assert orjson.loads(stored) == {
        "operation": "embeddings",
        "model": None,
        "input_tokens": None,
        "output_tokens": None,
        "upstream_cost_usd": None,
    }
