"""Migration 0008 adds `overage_charges`, the record that keeps each hold's overage to one charge,
backfilled from the overage ledger entries written before it; the downgrade to 0007 drops it and the
upgrade again rebuilds the same rows."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from tests.credits.helpers import database_at, migrate_to

BEFORE = "0007_shared_outbox"
CHARGES = (
    "SELECT reservation_id::text, user_id, credits, taken, owed, created_at FROM overage_charges "
    "ORDER BY reservation_id"
)


@pytest.fixture
async def db(make_database_url: Callable[[str], str]) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    url = make_database_url("overage_migration")
    async with database_at(url, BEFORE) as conn:
        yield url, conn


async def _entry(conn: asyncpg.Connection, user: str, amount: int, balance: int, reference: str) -> Any:
    return await conn.fetchval(
        "INSERT INTO ledger_entries (user_id, type, amount, balance_after, reference) "
        "VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
        user,
        "usage" if amount < 0 else "signup_bonus",
        amount,
        balance,
        reference,
    )


async def test_overage_entries_backfilled_and_the_downgrade_round_trips(
    db: tuple[str, asyncpg.Connection],
) -> None:
    url, conn = db
    user = f"u-{uuid.uuid4().hex[:12]}"
    first, second, plain = (str(uuid.uuid4()) for _ in range(3))
    await conn.execute("INSERT INTO accounts (user_id, balance) VALUES ($1, 1)", user)
    await _entry(conn, user, 10, 10, f"signup:{user}")
    await _entry(conn, user, -4, 6, f"reservation:{first}:commit")
    first_at = await _entry(conn, user, -5, 1, f"reservation:{first}:overage")
    await _entry(conn, user, -1, 0, f"reservation:{plain}:commit")  # no overage: no record
    second_at = await _entry(conn, user, -2, 0, f"reservation:{second}:overage")

    await migrate_to(url, "head")
    rows = [tuple(r) for r in await conn.fetch(CHARGES)]
    # The ledger knows only what was taken: that is the record's credits, none owed.
    assert rows == sorted([(first, user, 5, 5, 0, first_at), (second, user, 2, 2, 0, second_at)])

    await migrate_to(url, BEFORE, down=True)
    assert await conn.fetchval("SELECT to_regclass('overage_charges')") is None
    await migrate_to(url, "head")
    assert [tuple(r) for r in await conn.fetch(CHARGES)] == rows
