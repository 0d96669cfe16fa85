"""The operator's figures (docs/api.md, Credits "Operator insight") computed from what stores/analytics.py
sums in PostgreSQL, as typed results (api_responses.py shapes their JSON).

Ranges are UTC days, both ends included; None is unbounded. Flows (revenue, packs, credits in and
out, upstream cost, sign-ups) count what happened in the range. `total_users` and `tier_breakdown`
count the accounts that exist at the end of the range (by their current tier), and
`total_credits_remaining` their balances now. A refund counts on the day it happened.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from services.credits.stores import analytics as analytics_store
from services.credits.stores.analytics import AccountFacts, LedgerGroup

CREDITS_IN = ("signup_bonus", "purchase", "admin_add", "migration")
UNKNOWN = "unknown"  # usage entries without details (or without a model)


def cents(value: float) -> int:
    return int(Decimal(str(value)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


@dataclass(frozen=True)
class Sources:
    ledger: Sequence[LedgerGroup]
    packs: Sequence[Any]  # stores.analytics.pack_sales rows
    money: Sequence[Any]  # stores.analytics.money_days rows
    buyers: Any  # stores.analytics.buyers row
    accounts: AccountFacts
    cohort: Any = (
        None  # stores.analytics.cohort_funnel row; None for a range open at the start (every account)
    )


@dataclass(frozen=True)
class ModelUsage:
    requests: int
    credits: int
    upstream_cost_usd: float | None  # None when no entry of the model has a cost


@dataclass(frozen=True)
class Funnel:
    signed_up: int
    bought: int
    bought_again: int


@dataclass(frozen=True)
class PackFigures:
    pack: str
    price_cents: int
    credits: int
    packs_sold: int
    revenue_cents: int
    refunded_cents: int
    upstream_cost_usd: float | None  # the pack's "max AI cost"
    margin: float | None


@dataclass(frozen=True)
class DayFigures:
    day: date
    new_users: int
    paying_users: int
    revenue_cents: int
    packs_sold: int
    credits_purchased: int
    credits_used: int
    upstream_cost_usd: float


@dataclass(frozen=True)
class Figures:
    """The operator's figures over a range (docs/operator-insight.md defines each)."""

    total_users: int
    paying_users: int
    conversion_rate: float
    tier_breakdown: dict[str, int]
    revenue_by_pack_cents: dict[str, int]
    total_credits_purchased: int
    total_credits_used: int
    total_credits_remaining: int
    revenue_cents: int
    packs_sold: int
    average_pack_cents: int
    lifetime_value_cents: int
    repeat_purchase_rate: float
    median_days_between_purchases: float | None
    credit_utilization: float
    credits_granted_or_bought: int
    usage_by_operation: dict[str, int]
    usage_by_model: dict[str, ModelUsage]
    upstream_cost_usd: float
    upstream_cost_per_credit_usd: float | None
    gross_margin: float | None
    funnel: Funnel
    packs: tuple[PackFigures, ...]
    daily: tuple[DayFigures, ...]  # one per day with activity, in order


def usage_by_model(ledger: Sequence[LedgerGroup]) -> dict[str, ModelUsage]:
    requests: dict[str, int] = defaultdict(int)
    credits: dict[str, int] = defaultdict(int)
    costs: dict[str, float] = {}
    for g in ledger:
        if g.type != "usage" or g.day is not None or g.operation is not None or g.model is None:
            continue
        model = g.model or UNKNOWN
        requests[model] += g.entries
        credits[model] += -g.credits
        if g.costed_credits or g.upstream_cost_usd:
            costs[model] = (costs.get(model) or 0.0) + g.upstream_cost_usd
    return {m: ModelUsage(requests[m], credits[m], costs.get(m)) for m in requests}


def pack_figures(packs: Sequence[Any], cost_per_credit: float | None) -> tuple[PackFigures, ...]:
    figures = []
    for p in packs:
        price, credits = int(p.price_cents), int(p.pack_credits)
        # "Max AI cost" of a pack: its credits all used at the range's upstream cost per credit.
        pack_cost = credits * cost_per_credit if cost_per_credit is not None else None
        figures.append(
            PackFigures(
                pack=p.pack,
                price_cents=price,
                credits=credits,
                packs_sold=int(p.sold),
                revenue_cents=int(p.cents) - int(p.refunded_cents),
                refunded_cents=int(p.refunded_cents),
                upstream_cost_usd=pack_cost,
                margin=(price / 100 - pack_cost) / (price / 100) if pack_cost is not None and price else None,
            )
        )
    return tuple(figures)


def daily_figures(src: Sources) -> tuple[DayFigures, ...]:
    purchased: dict[date, int] = defaultdict(int)
    used: dict[date, int] = defaultdict(int)
    costs: dict[date, float] = defaultdict(float)
    for g in src.ledger:
        if g.day is None:
            continue
        if g.type == "purchase":
            purchased[g.day] += g.credits
        elif g.type == "usage":
            used[g.day] += -g.credits
            costs[g.day] += g.upstream_cost_usd
    money = {m.day: m for m in src.money}
    signups = dict(src.accounts.signups)
    days = sorted(purchased.keys() | used.keys() | money.keys() | signups.keys())
    return tuple(
        DayFigures(
            day=d,
            new_users=signups.get(d, 0),
            paying_users=int(money[d].paying_users) if d in money else 0,
            revenue_cents=int(money[d].revenue_cents) if d in money else 0,
            packs_sold=int(money[d].packs_sold) if d in money else 0,
            credits_purchased=purchased.get(d, 0),
            credits_used=used.get(d, 0),
            upstream_cost_usd=costs.get(d, 0.0),
        )
        for d in days
    )


def report(src: Sources) -> Figures:
    by_type = {g.type: g for g in src.ledger if g.day is None and g.operation is None and g.model is None}
    usage = by_type.get("usage")
    used = -usage.credits if usage else 0
    upstream_cost = usage.upstream_cost_usd if usage else 0.0
    costed_credits = usage.costed_credits if usage else 0
    cost_per_credit = upstream_cost / costed_credits if costed_credits else None
    purchased = by_type["purchase"].credits if "purchase" in by_type else 0
    credits_in = sum(by_type[t].credits for t in CREDITS_IN if t in by_type)

    usage_by_operation: dict[str, int] = defaultdict(int)
    for g in src.ledger:
        if g.type == "usage" and g.day is None and g.operation is not None:
            usage_by_operation[g.operation or UNKNOWN] += -g.credits

    packs = pack_figures(src.packs, cost_per_credit)
    revenue_by_pack = {p.pack: p.revenue_cents for p in packs}
    revenue = sum(p.revenue_cents for p in packs)
    packs_sold = sum(p.packs_sold for p in packs)

    tiers: dict[str, int] = {"free": 0} | src.accounts.tiers
    total_users = sum(tiers.values())
    # Signed up in the range → bought by its end → bought again.
    if src.cohort is not None:
        c = src.cohort
        funnel = Funnel(int(c.signed_up), int(c.bought), int(c.bought_again))
    else:
        b = src.buyers
        funnel = Funnel(total_users, int(b.ever_bought), int(b.bought_twice))

    paying = int(src.buyers.paying)
    median = src.buyers.median_days
    revenue_usd = revenue / 100
    return Figures(
        total_users=total_users,
        paying_users=paying,
        conversion_rate=ratio(paying, total_users),
        tier_breakdown=tiers,
        revenue_by_pack_cents=revenue_by_pack,
        total_credits_purchased=purchased,
        total_credits_used=used,
        total_credits_remaining=src.accounts.remaining,
        revenue_cents=revenue,
        packs_sold=packs_sold,
        average_pack_cents=cents(ratio(revenue, packs_sold)),
        lifetime_value_cents=cents(ratio(revenue, paying)),
        repeat_purchase_rate=ratio(int(src.buyers.repeat), paying),
        median_days_between_purchases=float(median) if median is not None else None,
        credit_utilization=ratio(used, credits_in),
        credits_granted_or_bought=credits_in,
        usage_by_operation=dict(usage_by_operation),
        usage_by_model=usage_by_model(src.ledger),
        upstream_cost_usd=upstream_cost,
        upstream_cost_per_credit_usd=cost_per_credit,
        gross_margin=(revenue_usd - upstream_cost) / revenue_usd if revenue > 0 else None,
        funnel=funnel,
        packs=packs,
        daily=daily_figures(src),
    )


class Analytics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def roll_up(self) -> None:
        """Sums the days that ended into ledger_daily (run by the sweeper now and then, so requests
        rarely do it; see migration 0005)."""
        async with self.engine.begin() as conn:
            await analytics_store.roll_up_ledger(conn)

    async def figures(self, first: date | None = None, last: date | None = None) -> Figures:
        """The operator's figures for the UTC days first..last (None: unbounded), computed by `report`."""
        async with self.engine.begin() as conn:
            await analytics_store.analytics_settings(conn)
            sources = Sources(
                ledger=await analytics_store.ledger_groups(conn, first, last),
                packs=await analytics_store.pack_sales(conn, first, last),
                money=await analytics_store.money_days(conn, first, last),
                buyers=await analytics_store.buyers(conn, first, last),
                accounts=await analytics_store.account_facts(conn, first, last),
                cohort=await analytics_store.cohort_funnel(conn, first, last) if first else None,
            )
        return report(sources)
