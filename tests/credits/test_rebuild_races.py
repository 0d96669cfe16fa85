"""A Redis rebuild that lands between a reserve's script and the hold's PostgreSQL insert: the hold is
put back if its credits are still free, and refused (402, row released) if they are not — never lost,
never counted twice. Driven deterministically by holding the group-commit writer at a gate."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from services.credits.app import Runtime
from shared.errors import InsufficientCredits
from tests.support.credits_service import credits_settings


@pytest.fixture
async def runtime(credits: Any, credits_database_url: str, redis_url: str) -> AsyncIterator[Runtime]:
    settings = credits_settings(
        database_url=credits_database_url,
        redis_url=redis_url,
        broker_namespace="unused",
        redis_namespace=f"credits-race-{uuid.uuid4().hex[:6]}",
        run_background_tasks=False,
        run_consumer=False,
        auto_migrate=False,
    )
    rt = await Runtime.open(settings, broker=False)
    yield rt
    await rt.close()


def gate_writer(rt: Runtime) -> asyncio.Event:
    gate = asyncio.Event()
    write: Callable[[Any], Awaitable[None]] = rt.ledger.writer._write

    async def gated(batch: Any) -> None:
        await gate.wait()
        await write(batch)

    rt.ledger.writer._write = gated  # type: ignore[method-assign]
    return gate


async def wipe_and_rebuild(rt: Runtime, user_id: str) -> tuple[int, int]:
    await rt.redis.delete(*rt.ledger.holds.keys(user_id))
    return await rt.ledger.live(user_id)


async def test_hold_missed_by_a_rebuild_is_restored(runtime: Runtime, pg: asyncpg.Pool, user_id: str) -> None:
    ledger = runtime.ledger
    await ledger.create_user(user_id)
    gate = gate_writer(runtime)
    first = asyncio.create_task(ledger.reserve(user_id, 6, None))
    await asyncio.sleep(0.3)  # the script has run; the insert waits at the gate
    assert await wipe_and_rebuild(runtime, user_id) == (10, 0)  # PostgreSQL has no hold yet
    gate.set()
    result = await first
    assert result is not None and result.available == 4
    assert await ledger.live(user_id) == (4, 6)  # put back once, not twice
    status = await pg.fetchval("SELECT status FROM reservations WHERE id = $1::uuid", result.reservation.id)
    assert status == "held"


async def test_hold_whose_credits_were_taken_meanwhile_is_refused(
    runtime: Runtime, pg: asyncpg.Pool, user_id: str
) -> None:
    ledger = runtime.ledger
    await ledger.create_user(user_id)
    gate = gate_writer(runtime)
    first = asyncio.create_task(ledger.reserve(user_id, 7, None))
    await asyncio.sleep(0.3)
    assert await wipe_and_rebuild(runtime, user_id) == (10, 0)
    # After the rebuild the 10 credits look free; another reserve takes 8 of them.
    second = asyncio.create_task(ledger.reserve(user_id, 8, None))
    await asyncio.sleep(0.3)
    gate.set()
    with pytest.raises(InsufficientCredits):
        await first
    kept = await second
    assert kept is not None
    assert await ledger.live(user_id) == (2, 8)
    rows = await pg.fetch(
        "SELECT amount, status FROM reservations WHERE user_id = $1 ORDER BY amount", user_id
    )
    assert [(r["amount"], r["status"]) for r in rows] == [(7, "released"), (8, "held")]


async def test_commit_sync_arriving_after_a_rebuild_changes_nothing(runtime: Runtime, user_id: str) -> None:
    """The commit is in PostgreSQL, its Redis sync is late, and a rebuild lands in between: the late
    sync must neither charge again (version compare) nor free the hold twice (membership)."""
    ledger = runtime.ledger
    await ledger.create_user(user_id)
    held = await ledger.reserve(user_id, 5, None)
    assert held is not None
    gate = asyncio.Event()
    apply = ledger.holds.apply

    async def late_apply(*args: Any, **kwargs: Any) -> int | None:
        await gate.wait()
        return await apply(*args, **kwargs)

    ledger.holds.apply = late_apply  # type: ignore[method-assign]
    committing = asyncio.create_task(ledger.commit(held.reservation.id, 3))
    await asyncio.sleep(0.3)  # committed in PostgreSQL; the sync waits
    ledger.holds.apply = apply  # type: ignore[method-assign]
    assert await wipe_and_rebuild(runtime, user_id) == (7, 0)
    gate.set()
    result = await committing
    assert result.charged == 3 and result.available == 7
    assert await ledger.live(user_id) == (7, 0)
