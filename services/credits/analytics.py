"""The operator's figures (docs/api.md, Credits "Operator insight") shaped from what stores/analytics.py sums in PostgreSQL.

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


def report(src: Sources) -> dict[str, Any]:
    by_type = {g.type: g for g in src.ledger if g.day is None and g.operation is None and g.model is None}
    usage = by_type.get("usage")
    used = -usage.credits if usage else 0
    upstream_cost = usage.upstream_cost_usd if usage else 0.0
    costed_credits = usage.costed_credits if usage else 0
    cost_per_credit = upstream_cost / costed_credits if costed_credits else None
    purchased = by_type["purchase"].credits if "purchase" in by_type else 0
    credits_in = sum(by_type[t].credits for t in CREDITS_IN if t in by_type)

    usage_by_operation: dict[str, int] = defaultdict(int)
    usage_by_model: dict[str, dict[str, Any]] = {}
    for g in src.ledger:
        if g.type != "usage" or g.day is not None:
            continue
        if g.operation is not None:
            usage_by_operation[g.operation or UNKNOWN] += -g.credits
        elif g.model is not None:
            entry = usage_by_model.setdefault(
                g.model or UNKNOWN, {"requests": 0, "credits": 0, "upstream_cost_usd": None}
            )
            entry["requests"] += g.entries
            entry["credits"] += -g.credits
            if g.costed_credits or g.upstream_cost_usd:
                entry["upstream_cost_usd"] = (entry["upstream_cost_usd"] or 0.0) + g.upstream_cost_usd

    packs = []
    revenue_by_pack: dict[str, int] = {}
    revenue = packs_sold = 0
    for p in src.packs:
        net = int(p.cents) - int(p.refunded_cents)
        revenue_by_pack[p.pack] = net
        revenue += net
        packs_sold += int(p.sold)
        price, credits = int(p.price_cents), int(p.pack_credits)
        # "Max AI cost" of a pack: its credits all used at the range's upstream cost per credit.
        pack_cost = credits * cost_per_credit if cost_per_credit is not None else None
        packs.append(
            {
                "pack": p.pack,
                "price_cents": price,
                "credits": credits,
                "packs_sold": int(p.sold),
                "revenue_cents": net,
                "refunded_cents": int(p.refunded_cents),
                "upstream_cost_usd": pack_cost,
                "margin": (price / 100 - pack_cost) / (price / 100)
                if pack_cost is not None and price
                else None,
            }
        )

    days: dict[date, dict[str, Any]] = {}

    def day(d: date) -> dict[str, Any]:
        return days.setdefault(
            d,
            {
                "date": d.isoformat(),
                "new_users": 0,
                "paying_users": 0,
                "revenue_cents": 0,
                "packs_sold": 0,
                "credits_purchased": 0,
                "credits_used": 0,
                "upstream_cost_usd": 0.0,
            },
        )

    for g in src.ledger:
        if g.day is None:
            continue
        if g.type == "purchase":
            day(g.day)["credits_purchased"] += g.credits
        elif g.type == "usage":
            row = day(g.day)
            row["credits_used"] += -g.credits
            row["upstream_cost_usd"] += g.upstream_cost_usd
    for m in src.money:
        row = day(m.day)
        row["revenue_cents"] = int(m.revenue_cents)
        row["packs_sold"] = int(m.packs_sold)
        row["paying_users"] = int(m.paying_users)

    tiers: dict[str, int] = {"free": 0} | src.accounts.tiers
    total_users = sum(tiers.values())
    remaining = src.accounts.remaining
    for d, users in src.accounts.signups:
        day(d)["new_users"] = users
    # Signed up in the range → bought by its end → bought again.
    if src.cohort is not None:
        c = src.cohort
        funnel = {"signed_up": int(c.signed_up), "bought": int(c.bought), "bought_again": int(c.bought_again)}
    else:
        b = src.buyers
        funnel = {"signed_up": total_users, "bought": int(b.ever_bought), "bought_again": int(b.bought_twice)}

    paying = int(src.buyers.paying)
    median = src.buyers.median_days
    revenue_usd = revenue / 100
    return {
        "total_users": total_users,
        "paying_users": paying,
        "conversion_rate": ratio(paying, total_users),
        "tier_breakdown": tiers,
        "revenue_by_pack_cents": revenue_by_pack,
        "total_credits_purchased": purchased,
        "total_credits_used": used,
        "total_credits_remaining": remaining,
        "revenue_cents": revenue,
        "packs_sold": packs_sold,
        "average_pack_cents": cents(ratio(revenue, packs_sold)),
        "lifetime_value_cents": cents(ratio(revenue, paying)),
        "repeat_purchase_rate": ratio(int(src.buyers.repeat), paying),
        "median_days_between_purchases": float(median) if median is not None else None,
        "credit_utilization": ratio(used, credits_in),
        "credits_granted_or_bought": credits_in,
        "usage_by_operation": dict(usage_by_operation),
        "usage_by_model": usage_by_model,
        "upstream_cost_usd": upstream_cost,
        "upstream_cost_per_credit_usd": cost_per_credit,
        "gross_margin": (revenue_usd - upstream_cost) / revenue_usd if revenue > 0 else None,
        "funnel": funnel,
        "packs": packs,
        "daily": [days[d] for d in sorted(days)],
    }


class Analytics:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def roll_up(self) -> None:
        """Sums the days that ended into ledger_daily (run by the sweeper now and then, so requests
        rarely do it; see migration 0005)."""
        async with self.engine.begin() as conn:
            await analytics_store.roll_up_ledger(conn)

    async def figures(self, first: date | None = None, last: date | None = None) -> dict[str, Any]:
        """The operator's figures for the UTC days first..last (None: unbounded), shaped by `report`."""
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
