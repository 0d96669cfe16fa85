"""SQL of the operator's figures (analytics.py computes them).

Whole days of the ledger come from `ledger_daily` (rolled up by credits_roll_up_ledger(), migration
0005), the rest from `ledger_entries` by its created_at index; purchases, refunds and accounts are
read by their date indexes. Each statement below is one pass over what it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


def _day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _bounds(column: str, lo: datetime | None, hi: datetime | None) -> str:
    """SQL conditions `lo <= column < hi` for the bounds that are set (the values bound as :lo/:hi)."""
    parts = ["true"]
    if lo is not None:
        parts.append(f"{column} >= :lo")
    if hi is not None:
        parts.append(f"{column} < :hi")
    return " AND ".join(parts)


async def roll_up_ledger(conn: AsyncConnection) -> date | None:
    """Sums the whole days not yet in ledger_daily (a no-op when up to date); returns the last day
    summed (None: the ledger is empty and nothing was ever summed)."""
    rolled: date | None = (await conn.execute(text("SELECT credits_roll_up_ledger()"))).scalar_one()
    return rolled


@dataclass(frozen=True)
class LedgerGroup:
    """One grouping of the ledger over the range: by type alone, or with its operation, model or day."""

    day: date | None
    type: str
    operation: str | None
    model: str | None
    entries: int
    credits: int
    costed_credits: int
    upstream_cost_usd: float


async def ledger_groups(conn: AsyncConnection, first: date | None, last: date | None) -> list[LedgerGroup]:
    rolled = await roll_up_ledger(conn)
    lo = _day_start(first) if first else None
    hi = _day_start(last + timedelta(days=1)) if last else None
    live_lo = lo
    if rolled is not None:
        rolled_end = _day_start(rolled + timedelta(days=1))
        live_lo = max(lo, rolled_end) if lo else rolled_end
    daily_where = ["d.day <= :rolled" if rolled is not None else "false"]
    if first is not None:
        daily_where.append("d.day >= :first")
    if last is not None:
        daily_where.append("d.day <= :last")
    live_where = _bounds("e.created_at", live_lo, hi)
    query = f"""
        WITH days AS (
            SELECT d.day, d.type, d.operation, d.model, d.entries, d.credits, d.costed_credits,
                   d.upstream_cost_usd
            FROM ledger_daily d WHERE {" AND ".join(daily_where)}
            UNION ALL
            SELECT (e.created_at AT TIME ZONE 'UTC')::date, e.type,
                   COALESCE(e.details ->> 'operation', ''), COALESCE(e.details ->> 'model', ''),
                   count(*), sum(e.amount),
                   COALESCE(sum(-e.amount) FILTER (WHERE e.details ->> 'upstream_cost_usd' IS NOT NULL), 0),
                   COALESCE(sum((e.details ->> 'upstream_cost_usd')::numeric), 0)
            FROM ledger_entries e WHERE {live_where}
            GROUP BY 1, 2, 3, 4
        )
        SELECT day, type, operation, model, GROUPING(day, operation, model) AS grouped,
               sum(entries) AS entries, sum(credits) AS credits, sum(costed_credits) AS costed_credits,
               sum(upstream_cost_usd) AS upstream_cost_usd
        FROM days
        GROUP BY GROUPING SETS ((type), (type, operation), (type, model), (day, type))
    """
    rows = await conn.execute(
        text(query), {"rolled": rolled, "first": first, "last": last, "lo": live_lo, "hi": hi}
    )
    groups = []
    for r in rows:
        # GROUPING() sets a bit per column summed away: day 4, operation 2, model 1.
        groups.append(
            LedgerGroup(
                day=r.day if not r.grouped & 4 else None,
                type=r.type,
                operation=r.operation if not r.grouped & 2 else None,
                model=r.model if not r.grouped & 1 else None,
                entries=int(r.entries),
                credits=int(r.credits),
                costed_credits=int(r.costed_credits),
                upstream_cost_usd=float(r.upstream_cost_usd),
            )
        )
    return groups


@dataclass(frozen=True)
class _Split:
    """A range cut where the daily rollups end: whole days up to `rolled` come from the *_daily
    tables, the rest (`lo`..`hi`) from the base tables."""

    first: date | None
    last: date | None
    rolled: date | None
    lo: datetime | None  # start of what the base tables supply
    hi: datetime | None  # end of the range (exclusive)

    def daily(self, column: str) -> str:
        """SQL conditions on a rollup's day column (bound as :rolled/:first/:last)."""
        parts = [f"{column} <= :rolled" if self.rolled is not None else "false"]
        if self.first is not None:
            parts.append(f"{column} >= :first")
        if self.last is not None:
            parts.append(f"{column} <= :last")
        return " AND ".join(parts)

    def live(self, column: str) -> str:
        return _bounds(column, self.lo, self.hi)

    def params(self) -> dict[str, Any]:
        return {"rolled": self.rolled, "first": self.first, "last": self.last, "lo": self.lo, "hi": self.hi}


async def _split(conn: AsyncConnection, first: date | None, last: date | None) -> _Split:
    rolled: date | None = (
        await conn.execute(text("SELECT rolled_through FROM ledger_daily_state"))
    ).scalar_one()
    return _cut(rolled, first, last)


def _cut(rolled: date | None, first: date | None, last: date | None) -> _Split:
    lo = _day_start(first) if first else None
    if rolled is not None:
        rolled_end = _day_start(rolled + timedelta(days=1))
        lo = max(lo, rolled_end) if lo else rolled_end
    hi = _day_start(last + timedelta(days=1)) if last else None
    return _Split(first, last, rolled, lo, hi)


async def pack_sales(conn: AsyncConnection, first: date | None, last: date | None) -> list[Any]:
    """Per pack over the range: packs sold, their cents and credits, the latest price and credits of
    the pack, and the cents refunded in the range (of purchases of any date)."""
    cut = await _split(conn, first, last)
    query = f"""
        WITH sales AS (
            SELECT pack, sum(sold) AS sold, sum(cents) AS cents, sum(refunded) AS refunded_cents
            FROM (
                SELECT d.pack, d.sold, d.cents, d.refunded_cents AS refunded
                FROM purchases_daily d WHERE {cut.daily("d.day")}
                UNION ALL
                SELECT pack, 1, amount_cents, 0 FROM purchases WHERE {cut.live("applied_at")}
                UNION ALL
                SELECT p.pack, 0, 0, r.cents
                FROM purchase_refunds r JOIN purchases p ON p.purchase_id = r.purchase_id
                WHERE {cut.live("r.refunded_at")}
            ) x
            GROUP BY pack
        )
        SELECT s.pack, s.sold, s.cents, s.refunded_cents, latest.amount_cents AS price_cents,
               latest.credits AS pack_credits
        FROM sales s
        -- The pack's price and credits: those of its latest purchase up to the end of the range.
        CROSS JOIN LATERAL (
            SELECT q.amount_cents, q.credits FROM purchases q
            WHERE q.pack = s.pack {"AND q.applied_at < :hi" if cut.hi is not None else ""}
            ORDER BY q.applied_at DESC, q.purchase_id DESC LIMIT 1
        ) latest
        ORDER BY 5, 1
    """
    return list(await conn.execute(text(query), cut.params()))


async def money_days(conn: AsyncConnection, first: date | None, last: date | None) -> list[Any]:
    """Per UTC day: revenue net of refunds, packs sold, paying users (distinct buyers that day)."""
    cut = await _split(conn, first, last)
    query = f"""
        SELECT day, sum(cents) AS revenue_cents, sum(sold) AS packs_sold, sum(payers) AS paying_users
        FROM (
            SELECT d.day, sum(d.cents - d.refunded_cents) AS cents, sum(d.sold) AS sold, 0 AS payers
            FROM purchases_daily d WHERE {cut.daily("d.day")} GROUP BY d.day
            UNION ALL
            SELECT b.day, 0, 0, b.payers FROM buyers_daily b WHERE {cut.daily("b.day")}
            UNION ALL
            SELECT day, sum(cents), count(user_id), count(DISTINCT user_id)
            FROM (
                SELECT (applied_at AT TIME ZONE 'UTC')::date AS day, amount_cents AS cents, user_id
                FROM purchases WHERE {cut.live("applied_at")}
                UNION ALL
                SELECT (refunded_at AT TIME ZONE 'UTC')::date, -cents, NULL
                FROM purchase_refunds WHERE {cut.live("refunded_at")}
            ) m
            GROUP BY day
        ) x
        GROUP BY day
    """
    return list(await conn.execute(text(query), cut.params()))


async def buyers(conn: AsyncConnection, first: date | None, last: date | None) -> Any:
    """Users who ever bought by the end of the range and of them those who bought twice (whole days
    from buyers_daily); paying users in the range and of them those with 2+ purchases in it (the
    same for a range open at the start, else one pass over the range's purchases); the median days
    between a purchase in the range and the same user's previous purchase (purchase_gaps)."""
    cut = await _split(conn, first, last)
    upto = _cut(cut.rolled, None, last)  # everything up to the end of the range
    # Each live purchase's rank among its user's purchases and the time since the previous one.
    earlier = "(q.applied_at, q.purchase_id) < (p.applied_at, p.purchase_id)"
    if first is None:
        in_range = "SELECT ever_bought AS paying, bought_twice AS repeat FROM ever"
    else:
        in_range = f"""
            SELECT count(*) AS paying, count(*) FILTER (WHERE n >= 2) AS repeat
            FROM (SELECT count(*) AS n FROM purchases
                  WHERE applied_at >= :range_lo {"AND applied_at < :hi" if cut.hi else ""} GROUP BY user_id) u
        """
    query = f"""
        WITH live AS (
            SELECT p.applied_at,
                   (SELECT count(*) FROM (SELECT 1 FROM purchases q WHERE q.user_id = p.user_id AND {earlier}
                                          LIMIT 2) two) AS earlier,
                   extract(epoch FROM p.applied_at - (
                       SELECT q.applied_at FROM purchases q WHERE q.user_id = p.user_id AND {earlier}
                       ORDER BY q.applied_at DESC, q.purchase_id DESC LIMIT 1)) / 86400 AS days
            FROM purchases p WHERE {_bounds("p.applied_at", upto.lo, upto.hi)}
        ), ever AS (
            SELECT COALESCE(sum(first_buyers), 0) AS ever_bought, COALESCE(sum(second_buyers), 0) AS bought_twice
            FROM (
                SELECT b.first_buyers, b.second_buyers FROM buyers_daily b
                WHERE {upto.daily("b.day")}
                UNION ALL
                SELECT count(*) FILTER (WHERE earlier = 0), count(*) FILTER (WHERE earlier = 1) FROM live
            ) x
        )
        SELECT r.paying, r.repeat, e.ever_bought, e.bought_twice,
               (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY days) FROM (
                    SELECT g.days FROM purchase_gaps g WHERE {cut.daily("g.day")}
                    UNION ALL
                    SELECT days FROM live WHERE days IS NOT NULL
                    {"AND applied_at >= :range_lo" if first is not None else ""}
                ) gaps) AS median_days
        FROM ever e CROSS JOIN ({in_range}) r
    """
    params = cut.params() | {"lo": upto.lo, "range_lo": _day_start(first) if first else None}
    return (await conn.execute(text(query), params)).one()


@dataclass(frozen=True)
class AccountFacts:
    tiers: dict[str, int]  # users per current tier, of the accounts that exist at the end of the range
    remaining: int  # their balances now
    signups: list[tuple[date, int]]  # users who signed up, per day of the range


async def account_facts(conn: AsyncConnection, first: date | None, last: date | None) -> AccountFacts:
    """From account_tiers (kept on write) less the accounts created after the range (by the
    created_at index: none for a range up to today); balances as the ledger's sum (a balance is
    the sum of its ledger entries: ledger_daily plus the entries since); sign-ups per day from
    signups_daily plus the accounts created since."""
    cut = await _split(conn, first, last)
    later = "accounts WHERE created_at >= :hi" if cut.hi is not None else "accounts WHERE false"
    tiers = await conn.execute(
        text(
            f"""
            SELECT t.tier, t.users - COALESCE(l.users, 0) AS users
            FROM account_tiers t
            LEFT JOIN (SELECT tier, count(*) AS users FROM {later} GROUP BY tier) l ON l.tier = t.tier
            """
        ),
        cut.params(),
    )
    # The ledger up to now, whatever the range: whole days rolled up, the rest read.
    since = _bounds("created_at", _day_start(cut.rolled + timedelta(days=1)) if cut.rolled else None, None)
    remaining = (
        await conn.execute(
            text(
                f"""
                SELECT COALESCE((SELECT sum(credits) FROM ledger_daily WHERE day <= :rolled), 0)
                     + COALESCE((SELECT sum(amount) FROM ledger_entries WHERE {since}), 0)
                     - COALESCE((SELECT sum(balance) FROM {later}), 0)
                """
            ),
            cut.params() | {"lo": _day_start(cut.rolled + timedelta(days=1)) if cut.rolled else None},
        )
    ).scalar_one()
    signups = await conn.execute(
        text(
            f"""
            SELECT day, sum(users) AS users FROM (
                SELECT s.day, s.users FROM signups_daily s WHERE {cut.daily("s.day")}
                UNION ALL
                SELECT (created_at AT TIME ZONE 'UTC')::date, count(*) FROM accounts
                WHERE {cut.live("created_at")} GROUP BY 1
            ) x
            GROUP BY day
            """
        ),
        cut.params(),
    )
    return AccountFacts(
        tiers={r.tier: int(r.users) for r in tiers if r.users > 0},
        remaining=int(remaining),
        signups=[(r.day, int(r.users)) for r in signups],
    )


async def cohort_funnel(conn: AsyncConnection, first: date, last: date | None) -> Any:
    """Of the users who signed up in the range (by the accounts' created_at index): how many bought by
    the end of the range, and bought twice (at most two purchases looked up per user)."""
    lo = _day_start(first)
    hi = _day_start(last + timedelta(days=1)) if last else None
    query = f"""
        SELECT count(*) AS signed_up, count(*) FILTER (WHERE c.n >= 1) AS bought,
               count(*) FILTER (WHERE c.n >= 2) AS bought_again
        FROM accounts a
        CROSS JOIN LATERAL (
            SELECT count(*) AS n FROM (
                SELECT 1 FROM purchases p
                WHERE p.user_id = a.user_id {"AND p.applied_at < :hi" if hi is not None else ""} LIMIT 2
            ) two
        ) c
        WHERE {_bounds("a.created_at", lo, hi)}
    """
    return (await conn.execute(text(query), {"lo": lo, "hi": hi})).one()


async def analytics_settings(conn: AsyncConnection) -> None:
    """For this transaction: each statement planned for its own bounds (a generic plan of
    `created_at >= $1` guesses a third of the table and scans it all), and sorts and hashes of a
    hundred thousand accounts in memory rather than on disk."""
    await conn.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))
    await conn.execute(text("SET LOCAL work_mem = '64MB'"))
