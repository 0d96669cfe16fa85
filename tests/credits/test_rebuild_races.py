"""Redis and PostgreSQL out of step, driven deterministically: a rebuild that lands between a reserve's
script and the hold's PostgreSQL insert (the writer held at a gate) puts the hold back if its credits
are still free and refuses it (402, row released) if not — never lost, never counted twice. Syncs that
never came (the process died after the PostgreSQL commit): a commit is read from PostgreSQL once its
hold is past its deadline, never handed back; credits added show at the next refused reserve or read."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from services.credits.runtime import Runtime
from shared.errors import Conflict, InsufficientCredits
from shared.events import PackPurchased, PackRefunded
from tests.credits.helpers import FakeClock, redis_syncs_lost
from tests.support.credits_service import credits_settings


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def runtime(
    credits: Any, credits_database_url: str, redis_url: str, clock: FakeClock
) -> AsyncIterator[Runtime]:
    # No sweeper: the scripts meet holds past their deadline before any sweep does.
    settings = credits_settings(
        database_url=credits_database_url,
        redis_url=redis_url,
        broker_namespace="unused",
        redis_namespace=f"credits-race-{uuid.uuid4().hex[:6]}",
        run_background_tasks=False,
        run_consumer=False,
        auto_migrate=False,
    )
    rt = await Runtime.open(settings, broker=False, clock=clock)
    yield rt
    await rt.close()


def gate_writer(rt: Runtime) -> asyncio.Event:
    gate = asyncio.Event()
    write: Callable[[Any], Awaitable[None]] = rt.reservations.writer._write

    async def gated(batch: Any) -> None:
        await gate.wait()
        await write(batch)

    rt.reservations.writer._write = gated  # type: ignore[method-assign]
    return gate


async def wipe_and_rebuild(rt: Runtime, user_id: str) -> tuple[int, int]:
    await rt.redis.delete(*rt.holds.keys(user_id))
    return await rt.mirror.live(user_id)


async def test_hold_missed_by_a_rebuild_is_restored(runtime: Runtime, pg: asyncpg.Pool, user_id: str) -> None:
    await runtime.accounts.create_user(user_id)
    gate = gate_writer(runtime)
    first = asyncio.create_task(runtime.reservations.reserve(user_id, 6, None))
    await asyncio.sleep(0.3)  # the script has run; the insert waits at the gate
    assert await wipe_and_rebuild(runtime, user_id) == (10, 0)  # PostgreSQL has no hold yet
    gate.set()
    result = await first
    assert result is not None and result.available == 4
    assert await runtime.mirror.live(user_id) == (4, 6)  # put back once, not twice
    status = await pg.fetchval("SELECT status FROM reservations WHERE id = $1::uuid", result.reservation.id)
    assert status == "held"


async def test_hold_whose_credits_were_taken_meanwhile_is_refused(
    runtime: Runtime, pg: asyncpg.Pool, user_id: str
) -> None:
    await runtime.accounts.create_user(user_id)
    gate = gate_writer(runtime)
    first = asyncio.create_task(runtime.reservations.reserve(user_id, 7, None))
    await asyncio.sleep(0.3)
    assert await wipe_and_rebuild(runtime, user_id) == (10, 0)
    # After the rebuild the 10 credits look free; another reserve takes 8 of them.
    second = asyncio.create_task(runtime.reservations.reserve(user_id, 8, None))
    await asyncio.sleep(0.3)
    gate.set()
    with pytest.raises(InsufficientCredits):
        await first
    kept = await second
    assert kept is not None
    assert await runtime.mirror.live(user_id) == (2, 8)
    rows = await pg.fetch(
        "SELECT amount, status FROM reservations WHERE user_id = $1 ORDER BY amount", user_id
    )
    assert [(r["amount"], r["status"]) for r in rows] == [(7, "released"), (8, "held")]


async def test_commit_sync_arriving_after_a_rebuild_changes_nothing(runtime: Runtime, user_id: str) -> None:
    """The commit is in PostgreSQL, its Redis sync is late, and a rebuild lands in between: the late
    sync must neither charge again (version compare) nor free the hold twice (membership)."""
    await runtime.accounts.create_user(user_id)
    held = await runtime.reservations.reserve(user_id, 5, None)
    assert held is not None
    gate = asyncio.Event()
    apply = runtime.holds.apply

    async def late_apply(*args: Any, **kwargs: Any) -> int | None:
        await gate.wait()
        return await apply(*args, **kwargs)

    runtime.holds.apply = late_apply  # type: ignore[method-assign]
    committing = asyncio.create_task(runtime.settlements.commit(held.reservation.id, 3))
    await asyncio.sleep(0.3)  # committed in PostgreSQL; the sync waits
    runtime.holds.apply = apply  # type: ignore[method-assign]
    assert await wipe_and_rebuild(runtime, user_id) == (7, 0)
    gate.set()
    result = await committing
    assert result.charged == 3 and result.available == 7
    assert await runtime.mirror.live(user_id) == (7, 0)


async def commit_losing_its_sync(runtime: Runtime, user_id: str, reserve: int, charge: int) -> None:
    """A new user reserves `reserve` credits and commits `charge` of them; the commit's Redis sync is lost."""
    await runtime.accounts.create_user(user_id)
    held = await runtime.reservations.reserve(user_id, reserve, None)
    assert held is not None
    with redis_syncs_lost(runtime.holds):
        assert (await runtime.settlements.commit(held.reservation.id, charge)).charged == charge


async def test_a_commit_whose_redis_sync_was_lost_is_never_handed_back(
    runtime: Runtime, clock: FakeClock, pg: asyncpg.Pool, user_id: str
) -> None:
    """Redis keeps the committed hold at the old balance: conservative until the deadline. Past it the
    scripts must not simply drop the hold (that would return the 4 charged credits); they read the
    account again from PostgreSQL."""
    await runtime.accounts.create_user(user_id)
    held = await runtime.reservations.reserve(user_id, 6, None, ttl_seconds=2)
    assert held is not None
    with redis_syncs_lost(runtime.holds):
        result = await runtime.settlements.commit(held.reservation.id, 4)
    assert result.charged == 4
    assert await pg.fetchval("SELECT balance FROM accounts WHERE user_id = $1", user_id) == 6
    assert await runtime.mirror.live(user_id) == (4, 6)  # stale but on the safe side: the hold still counts
    clock.now += timedelta(seconds=2 + runtime.settings.orphan_grace_seconds + 1)
    assert await runtime.mirror.live(user_id) == (6, 0)
    with pytest.raises(InsufficientCredits):
        await runtime.reservations.reserve(user_id, 7, None)
    kept = await runtime.reservations.reserve(user_id, 6, None)
    assert kept is not None and kept.available == 0
    assert await pg.fetchval("SELECT sum(amount) FROM ledger_entries WHERE user_id = $1", user_id) == 6


async def test_a_rebuild_leaves_out_holds_past_their_deadline(
    runtime: Runtime, clock: FakeClock, pg: asyncpg.Pool, user_id: str
) -> None:
    """PostgreSQL still says "held" for a hold past its deadline until the sweeper's next pass, but it
    can no longer be committed: a rebuild meanwhile must not count it (nor meet it again as dead)."""
    await runtime.accounts.create_user(user_id)
    held = await runtime.reservations.reserve(user_id, 3, None, ttl_seconds=1)
    assert held is not None
    clock.now += timedelta(seconds=1 + runtime.settings.orphan_grace_seconds + 1)
    assert await wipe_and_rebuild(runtime, user_id) == (10, 0)
    status = await pg.fetchval("SELECT status FROM reservations WHERE id = $1::uuid", held.reservation.id)
    assert status == "held"
    with pytest.raises(Conflict):
        await runtime.settlements.commit(held.reservation.id, None)
    assert await runtime.expiry.expire_due() == 0  # the refused commit already ended it
    assert await runtime.mirror.live(user_id) == (10, 0)
    assert await pg.fetchval("SELECT balance FROM accounts WHERE user_id = $1", user_id) == 10


async def test_credits_added_whose_redis_sync_was_lost_show_at_a_refused_reserve(
    runtime: Runtime, pg: asyncpg.Pool, user_id: str
) -> None:
    await runtime.accounts.create_user(user_id)
    with redis_syncs_lost(runtime.holds):
        assert await runtime.accounts.grant(user_id, 50, "paid by hand", "g-1")
    assert await pg.fetchval("SELECT balance FROM accounts WHERE user_id = $1", user_id) == 60
    assert await runtime.mirror.live(user_id) == (10, 0)  # Redis is behind: the grant does not show yet
    held = await runtime.reservations.reserve(user_id, 40, None)  # refused by Redis, then PostgreSQL is asked
    assert held is not None and held.available == 20
    # Nothing was granted twice on the way.
    assert await pg.fetchval("SELECT sum(amount) FROM ledger_entries WHERE user_id = $1", user_id) == 60


async def test_credits_added_whose_redis_sync_was_lost_show_at_the_account_read(
    runtime: Runtime, user_id: str
) -> None:
    await runtime.accounts.create_user(user_id)
    assert await runtime.reservations.reserve(user_id, 4, None) is not None
    with redis_syncs_lost(runtime.holds):
        assert await runtime.accounts.grant(user_id, 5, "paid by hand", "g-1")
    assert await runtime.mirror.live(user_id) == (6, 4)
    account = await runtime.accounts.account(user_id)
    assert (account.credits_remaining, account.credits_reserved) == (11, 4)
    assert await runtime.mirror.live(user_id) == (11, 4)


async def test_a_redelivered_purchase_syncs_what_its_first_delivery_could_not(
    runtime: Runtime, pg: asyncpg.Pool, user_id: str
) -> None:
    """Killed after the purchase's commit, before Redis and the ack: the broker redelivers it."""
    purchase = PackPurchased(
        purchase_id=f"cs_{uuid.uuid4().hex}",
        user_id=user_id,
        pack="starter",
        credits=100,
        unlocks_api=False,
        amount_cents=500,
        currency="usd",
    )
    await runtime.accounts.create_user(user_id)
    with redis_syncs_lost(runtime.holds):
        assert await runtime.purchases.apply_purchase(purchase)
    assert await runtime.mirror.live(user_id) == (10, 0)
    assert not await runtime.purchases.apply_purchase(purchase)  # a replay: credited once
    assert await runtime.mirror.live(user_id) == (110, 0)
    assert await pg.fetchval("SELECT sum(amount) FROM ledger_entries WHERE user_id = $1", user_id) == 110


async def test_a_commit_whose_redis_sync_was_lost_is_read_right_at_the_account_read(
    runtime: Runtime, user_id: str
) -> None:
    """Before the deadline Redis counts the committed hold and the old balance; the account read sees
    Redis behind PostgreSQL and rebuilds it: the charge counted once, not twice."""
    await commit_losing_its_sync(runtime, user_id, 6, 4)
    assert await runtime.mirror.live(user_id) == (4, 6)
    account = await runtime.accounts.account(user_id)
    assert (account.credits_remaining, account.credits_reserved) == (6, 0)


async def test_a_commit_whose_redis_sync_was_lost_does_not_refuse_a_reserve(
    runtime: Runtime, pg: asyncpg.Pool, user_id: str
) -> None:
    await commit_losing_its_sync(runtime, user_id, 6, 1)
    assert await runtime.mirror.live(user_id) == (4, 6)
    # Refused by Redis; PostgreSQL says 9 are free.
    again = await runtime.reservations.reserve(user_id, 9, None)
    assert again is not None and again.available == 0
    assert await pg.fetchval("SELECT balance FROM accounts WHERE user_id = $1", user_id) == 9


async def test_a_failed_sync_overtaken_by_a_later_one_is_rebuilt_by_the_sweeper(
    runtime: Runtime, pg: asyncpg.Pool, user_id: str
) -> None:
    """A grant's sync carries the account version past the lost commit's: the versions agree again,
    yet the committed hold is still counted. The sweeper rebuilds every user whose sync failed."""
    await commit_losing_its_sync(runtime, user_id, 6, 4)
    assert await runtime.accounts.grant(user_id, 1, "goodwill", "g-1")
    assert await runtime.mirror.live(user_id) == (1, 6)  # the charge counted twice: balance 7, hold 6
    assert await runtime.mirror.resync_failed() == 1
    assert await runtime.mirror.live(user_id) == (7, 0)
    assert await runtime.mirror.resync_failed() == 0


async def test_a_rebuild_if_behind_leaves_a_current_mirror_alone(
    runtime: Runtime, pg: asyncpg.Pool, user_id: str
) -> None:
    await runtime.accounts.create_user(user_id)
    epoch = await pg.fetchval("SELECT redis_epoch FROM accounts WHERE user_id = $1", user_id)
    await runtime.mirror.rebuild(user_id, if_behind=True)
    assert await pg.fetchval("SELECT redis_epoch FROM accounts WHERE user_id = $1", user_id) == epoch
    with redis_syncs_lost(runtime.holds):
        assert await runtime.accounts.grant(user_id, 3, "goodwill", "g-1")
    await runtime.mirror.rebuild(user_id, if_behind=True)
    assert await pg.fetchval("SELECT redis_epoch FROM accounts WHERE user_id = $1", user_id) == epoch + 1
    assert await runtime.mirror.live(user_id) == (13, 0)


async def test_a_refund_claws_back_credits_whose_redis_sync_was_lost(
    runtime: Runtime, pg: asyncpg.Pool, user_id: str
) -> None:
    """The pack's credits never reached Redis; its refund must still take them back, not record them
    as owed while they stay spendable."""
    purchase_id = f"cs_{uuid.uuid4().hex}"
    common = {"purchase_id": purchase_id, "user_id": user_id, "pack": "starter", "credits": 100}
    await runtime.accounts.create_user(user_id)
    with redis_syncs_lost(runtime.holds):
        assert await runtime.purchases.apply_purchase(
            PackPurchased(**common, unlocks_api=False, amount_cents=500, currency="usd")
        )
    assert await runtime.mirror.live(user_id) == (10, 0)
    assert await runtime.purchases.apply_refund(PackRefunded(**common, amount_cents=500, currency="usd"))
    account = await runtime.accounts.account(user_id)
    assert (account.credits_remaining, account.credits_owed) == (10, 0)
    assert await pg.fetchval("SELECT balance FROM accounts WHERE user_id = $1", user_id) == 10


async def test_users_whose_sync_failed_wait_for_a_sweep_that_can_reach_redis(
    runtime: Runtime, user_id: str
) -> None:
    other = f"{user_id}-b"
    for user in (user_id, other):
        await runtime.accounts.create_user(user)
    with redis_syncs_lost(runtime.holds):
        for user in (user_id, other):
            assert await runtime.accounts.grant(user, 5, "paid by hand", "g-1")
    holds = runtime.holds

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Redis still unreachable")

    holds.load = unreachable  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await runtime.mirror.resync_failed()
    del holds.load
    assert await runtime.mirror.resync_failed() == 2  # both still queued, the first one included
    for user in (user_id, other):
        assert await runtime.mirror.live(user) == (15, 0)
