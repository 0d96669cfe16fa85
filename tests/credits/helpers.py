"""Assertions on the effects the credits tests care about: balances, ledger rows, open holds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from alembic import command
from sqlalchemy.engine import make_url

from services.credits.holds import Holds
from services.credits.runtime import MIGRATIONS_DIR
from shared.db import alembic_config, ensure_database
from tests.support.credits_service import CreditsService


def assert_envelope(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "code", "message"}, body
    assert body["error"]["code"] == code, body


@contextlib.contextmanager
def redis_syncs_lost(holds: Holds) -> Iterator[None]:
    """Inside the block every Redis sync after a PostgreSQL commit fails, as when the process dies
    right after the commit (or Redis fails just then); everything else stays real."""

    async def lost(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the process died before syncing Redis")

    holds.apply = holds.apply_many = lost  # type: ignore[method-assign]
    try:
        yield
    finally:
        del holds.apply, holds.apply_many  # the class's methods again


class FakeClock:
    """A clock the test moves by hand (`clock.now += timedelta(...)`)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Checker:
    pg: asyncpg.Pool
    credits: CreditsService

    async def state(self, user_id: str) -> dict[str, Any]:
        """Everything PostgreSQL knows about a user: balances, ledger, holds, keys."""
        async with self.pg.acquire() as conn:
            account = await conn.fetchrow("SELECT * FROM accounts WHERE user_id = $1", user_id)
            ledger = await conn.fetch("SELECT * FROM ledger_entries WHERE user_id = $1 ORDER BY id", user_id)
            holds = await conn.fetch(
                "SELECT id, amount, status, charged FROM reservations WHERE user_id = $1 ORDER BY created_at, id",
                user_id,
            )
            keys = await conn.fetch(
                "SELECT id, revoked_at FROM api_keys WHERE user_id = $1 ORDER BY id", user_id
            )
            purchases = await conn.fetch(
                "SELECT * FROM purchases WHERE user_id = $1 ORDER BY purchase_id", user_id
            )
        return {
            "account": dict(account) if account else None,
            "ledger": [dict(r) for r in ledger],
            "holds": [dict(r) for r in holds],
            "keys": [dict(r) for r in keys],
            "purchases": [dict(r) for r in purchases],
        }

    async def consistent(self, user_id: str, client: httpx.AsyncClient | None = None) -> dict[str, Any]:
        """Balance = ledger sum, balance_after is the running sum, available = balance - open holds ≥ 0."""
        s = await self.state(user_id)
        assert s["account"] is not None
        running = 0
        for entry in s["ledger"]:
            running += entry["amount"]
            assert entry["balance_after"] == running, s["ledger"]
        assert s["account"]["balance"] == running
        held = sum(h["amount"] for h in s["holds"] if h["status"] == "held")
        for h in s["holds"]:
            if h["status"] == "committed":
                assert 0 <= h["charged"] <= h["amount"]
        assert s["account"]["balance"] - held >= 0
        if client is not None:
            r = await client.get(f"/v1/users/{user_id}/credits")
            assert r.status_code == 200, r.text
            acct = r.json()
            assert acct["credits_remaining"] == s["account"]["balance"] - held, (acct, s["account"], held)
            assert acct["credits_reserved"] == held
        return s


async def migrate_to(url: str, revision: str, *, down: bool = False) -> None:
    """Moves the database at `url` to `revision` of credits' migrations (down to it with `down`)."""
    cfg = alembic_config(url, MIGRATIONS_DIR)
    await asyncio.to_thread(command.downgrade if down else command.upgrade, cfg, revision)


@contextlib.asynccontextmanager
async def database_at(url: str, revision: str) -> AsyncIterator[asyncpg.Connection]:
    """A new database at `revision` of credits' migrations, and a connection to it."""
    await ensure_database(url)
    await migrate_to(url, revision)
    conn = await asyncpg.connect(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        yield conn
    finally:
        await conn.close()
