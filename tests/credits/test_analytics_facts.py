"""Migration 0006's analytics facts: the backfill of existing rows, the tier counter kept by the
accounts' triggers (bulk inserts, tier changes, deletes; not balance updates), the rebuild of the
daily rollups, and the downgrade back to 0005."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from alembic import command
from sqlalchemy.engine import make_url

from services.credits.runtime import MIGRATIONS_DIR
from shared.db import alembic_config, ensure_database


@pytest.fixture
async def db(make_database_url: Callable[[str], str]) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    url = make_database_url("analytics_facts")
    await ensure_database(url)
    await asyncio.to_thread(command.upgrade, alembic_config(url, MIGRATIONS_DIR), "0005_w15")
    conn = await asyncpg.connect(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    yield url, conn
    await conn.close()


async def migrate_to(url: str, revision: str, *, down: bool = False) -> None:
    cfg = alembic_config(url, MIGRATIONS_DIR)
    await asyncio.to_thread(command.downgrade if down else command.upgrade, cfg, revision)


async def tiers(conn: asyncpg.Connection) -> dict[str, int]:
    return {
        r["tier"]: r["users"] for r in await conn.fetch("SELECT tier, users FROM account_tiers") if r["users"]
    }


async def counted(conn: asyncpg.Connection) -> dict[str, int]:
    return {
        r["tier"]: r["n"] for r in await conn.fetch("SELECT tier, count(*) AS n FROM accounts GROUP BY tier")
    }


async def test_backfill_and_triggers_keep_the_facts(db: tuple[str, asyncpg.Connection]) -> None:
    url, conn = db
    # History written under 0005: three users, two days ago and yesterday; bob buys twice, a day apart.
    await conn.execute(
        """
        INSERT INTO accounts (user_id, tier, created_at) VALUES
            ('alice', 'free', now() - interval '3 days'), ('bob', 'pro', now() - interval '3 days'),
            ('carol', 'free', now() - interval '2 days');
        INSERT INTO purchases (purchase_id, user_id, pack, credits, amount_cents, currency, unlocks_api, applied_at)
        VALUES ('p1', 'bob', 'pro', 1200, 3000, 'usd', true, now() - interval '3 days'),
               ('p2', 'bob', 'pro', 1200, 3000, 'usd', true, now() - interval '2 days');
        INSERT INTO purchase_refunds (purchase_id, cumulative_credits, cents, refunded_at)
        VALUES ('p2', 600, 1500, now() - interval '2 days');
        """
    )
    await migrate_to(url, "head")
    assert await tiers(conn) == {"free": 2, "pro": 1}
    await conn.execute("SELECT credits_roll_up_ledger()")
    signups = await conn.fetch("SELECT day, users FROM signups_daily ORDER BY day")
    assert [r["users"] for r in signups] == [2, 1]
    buyers = await conn.fetch("SELECT payers, first_buyers, second_buyers FROM buyers_daily ORDER BY day")
    assert [tuple(r) for r in buyers] == [(1, 1, 0), (1, 0, 1)]
    sales = await conn.fetch("SELECT pack, sold, cents, refunded_cents FROM purchases_daily ORDER BY day")
    assert [tuple(r) for r in sales] == [("pro", 1, 3000, 0), ("pro", 1, 3000, 1500)]
    assert [float(r["days"]) for r in await conn.fetch("SELECT days FROM purchase_gaps")] == [1.0]

    # A bulk insert, a tier change, a balance update (no effect), a delete.
    await conn.execute("INSERT INTO accounts (user_id) SELECT 'u' || g FROM generate_series(1, 500) g")
    await conn.execute("UPDATE accounts SET tier = 'starter' WHERE user_id IN ('alice', 'u1')")
    await conn.execute("UPDATE accounts SET tier = 'starter' WHERE user_id = 'alice'")  # unchanged
    await conn.execute("UPDATE accounts SET balance = balance + 5")
    await conn.execute("DELETE FROM accounts WHERE user_id IN ('carol', 'u2')")
    assert await tiers(conn) == await counted(conn) == {"free": 498, "pro": 1, "starter": 2}

    # Rolled through NULL: the next roll-up empties the daily tables and sums every day again.
    await conn.execute(
        "UPDATE purchases SET applied_at = applied_at - interval '1 day' WHERE purchase_id = 'p1'"
    )
    await conn.execute("UPDATE ledger_daily_state SET rolled_through = NULL")
    await conn.execute("SELECT credits_roll_up_ledger()")
    assert [float(r["days"]) for r in await conn.fetch("SELECT days FROM purchase_gaps")] == [2.0]
    assert await conn.fetchval("SELECT sum(sold) FROM purchases_daily") == 2

    await migrate_to(url, "0005_w15", down=True)
    assert await conn.fetchval("SELECT to_regclass('account_tiers')") is None
    assert await conn.fetchval("SELECT credits_roll_up_ledger()") is not None
    await migrate_to(url, "head")
    assert await tiers(conn) == await counted(conn)
