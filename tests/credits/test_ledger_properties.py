"""Property test: random interleavings of grant / reserve / commit (full and partial) / release / expire /
Redis wipe / service restart, some of them concurrent, keep every ledger invariant. Some commits and
releases lose their Redis sync, as when the process dies right after the PostgreSQL commit: Redis may
then under-state the credits until the hold's deadline or the sweeper's pass, never over-state them.

Runs the domain against the real PostgreSQL and Redis with a fake clock (expiry is driven by advancing
it and calling the sweeper), in its own database and Redis key namespace so the package's running
service cannot sweep these holds with the real clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from services.credits.runtime import Runtime
from shared.errors import Conflict, InsufficientCredits
from tests.conftest import redis_client_for
from tests.credits.helpers import FakeClock, redis_syncs_lost
from tests.support.credits_service import credits_settings

NAMESPACE = f"credits-prop-{uuid.uuid4().hex[:6]}"

grant = st.tuples(st.just("grant"), st.integers(1, 20))
reserve = st.tuples(st.just("reserve"), st.integers(1, 15), st.integers(1, 4))  # amount, ttl seconds
commit = st.tuples(st.just("commit"), st.integers(0, 50), st.one_of(st.none(), st.floats(0, 1)))
release = st.tuples(st.just("release"), st.integers(0, 50))
lost_sync = st.tuples(
    st.sampled_from(["commit_lost", "commit_lost", "release_lost"]),
    st.integers(0, 50),
    st.one_of(st.none(), st.floats(0, 1)),
)
# seconds to move the clock; whether the sweeper's Redis pass runs too (else the scripts meet dead holds first)
expire = st.tuples(st.just("expire"), st.integers(1, 5), st.booleans())
wipe = st.tuples(st.just("wipe"))
restart = st.tuples(st.just("restart"))
simple = st.one_of(grant, reserve, reserve, commit, commit, release, lost_sync, lost_sync, expire, wipe)
burst = st.tuples(
    st.just("burst"),
    st.lists(st.one_of(grant, reserve, reserve, commit, release, wipe), min_size=2, max_size=8),
)
program = st.lists(st.one_of(simple, simple, simple, restart, burst), min_size=1, max_size=20)


@dataclass
class Hold:
    amount: int
    expires_at: datetime
    state: str = "held"
    charged: int = 0


@dataclass
class Model:
    balance: int = 10
    holds: dict[str, Hold] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    # Holds ended in PostgreSQL whose Redis sync was lost.
    unsynced: set[str] = field(default_factory=set)

    @property
    def held(self) -> int:
        return sum(h.amount for h in self.holds.values() if h.state == "held")

    def pick(self, index: int) -> str | None:
        return self.order[index % len(self.order)] if self.order else None


class Harness:
    def __init__(self, database_url: str, redis_url: str, redis_cluster: bool) -> None:
        self.settings = credits_settings(
            database_url=database_url,
            redis_url=redis_url,
            redis_cluster=redis_cluster,
            broker_namespace="unused",
            redis_namespace=NAMESPACE,
            run_background_tasks=False,
            run_consumer=False,
            orphan_grace_seconds=0,
        )
        self.clock = FakeClock()
        self.runtime: Runtime | None = None
        self.redis = redis_client_for(redis_url, redis_cluster)

    async def start(self) -> None:
        self.runtime = await Runtime.open(self.settings, broker=False, clock=self.clock)

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None

    async def wipe(self) -> None:
        keys = [k async for k in self.redis.scan_iter(match=f"{NAMESPACE}:*", count=1000)]
        if keys:
            await self.redis.delete(*keys)


async def run_program(h: Harness, pg: asyncpg.Pool, ops: list[Any]) -> None:
    user = f"p-{uuid.uuid4().hex[:10]}"
    model = Model()
    assert h.runtime is not None
    await h.runtime.accounts.create_user(user)

    async def step(op: tuple[Any, ...]) -> None:
        assert h.runtime is not None
        rt = h.runtime
        kind = op[0]
        if kind == "grant":
            await rt.accounts.grant(user, op[1], "prop", uuid.uuid4().hex)
            model.balance += op[1]
        elif kind == "reserve":
            try:
                result = await rt.reservations.reserve(user, op[1], None, op[2])
            except InsufficientCredits:
                return
            assert result is not None
            rid = result.reservation.id
            model.holds[rid] = Hold(op[1], result.reservation.expires_at)
            model.order.append(rid)
            assert result.available >= 0
        elif kind == "commit":
            rid = model.pick(op[1])
            if rid is None:
                return
            hold = model.holds[rid]
            amount = None if op[2] is None else int(op[2] * hold.amount)
            try:
                result = await rt.settlements.commit(rid, amount)
            except Conflict:
                status = await pg.fetchval("SELECT status FROM reservations WHERE id = $1::uuid", rid)
                assert status in ("released", "expired"), (hold, status)
                if status == "expired":
                    assert h.clock.now >= hold.expires_at, hold
                if hold.state == "held":  # a release in the same burst may not have reported yet
                    hold.state = status
                return
            assert hold.state in ("held", "committed"), hold
            if hold.state == "held":
                hold.state, hold.charged = "committed", result.charged
                model.balance -= result.charged
            assert result.charged == hold.charged and result.refunded == hold.amount - hold.charged
            assert result.available >= 0
        elif kind == "release":
            rid = model.pick(op[1])
            if rid is None:
                return
            hold = model.holds[rid]
            try:
                result = await rt.settlements.release(rid)
            except Conflict:
                # Committed, possibly by a commit in the same burst that has not reported yet.
                status = await pg.fetchval("SELECT status FROM reservations WHERE id = $1::uuid", rid)
                assert status == "committed", (hold, status)
                return
            assert hold.state != "committed", hold
            if hold.state == "held":
                hold.state = "released"
            assert result.available >= 0
        elif kind in ("commit_lost", "release_lost"):
            rid = model.pick(op[1])
            if rid is None:
                return
            with redis_syncs_lost(rt.holds):
                await step((kind.removesuffix("_lost"), op[1], op[2]))
            model.unsynced.add(rid)
        elif kind == "expire":
            h.clock.now += timedelta(seconds=op[1])
            await rt.expiry.expire_due()
            if op[2]:  # the rest of the sweeper's pass
                await rt.expiry.sweep_redis()
                await rt.mirror.resync_failed()
                model.unsynced.clear()
            for hold in model.holds.values():
                if hold.state == "held" and hold.expires_at <= h.clock.now:
                    hold.state = "expired"
        elif kind == "wipe":
            await h.wipe()
            model.unsynced.clear()  # rebuilt from PostgreSQL
        elif kind == "restart":
            await h.stop()
            await h.start()
        elif kind == "burst":
            await asyncio.gather(*(step(inner) for inner in op[1]))

    for op in ops:
        await step(op)
        await check(h, pg, user, model)
    # The end: every hold ends exactly once.
    h.clock.now += timedelta(seconds=10)
    assert h.runtime is not None
    await h.runtime.expiry.expire_due()
    for hold in model.holds.values():
        if hold.state == "held":
            hold.state = "expired"
    await check(h, pg, user, model)


async def check(h: Harness, pg: asyncpg.Pool, user: str, model: Model) -> None:
    assert h.runtime is not None
    account = await pg.fetchrow("SELECT balance FROM accounts WHERE user_id = $1", user)
    entries = await pg.fetch(
        "SELECT amount, balance_after, reference FROM ledger_entries WHERE user_id = $1 ORDER BY id", user
    )
    rows = {
        str(r["id"]): r
        for r in await pg.fetch(
            "SELECT id, status, charged, amount FROM reservations WHERE user_id = $1", user
        )
    }
    running = 0
    for e in entries:
        running += e["amount"]
        assert e["balance_after"] == running
    assert account["balance"] == running == model.balance
    # Each acknowledged hold is in PostgreSQL in the state the model expects; no other hold is open.
    for rid, hold in model.holds.items():
        assert rows[rid]["status"] == hold.state, (rid, hold, rows[rid])
        if hold.state == "committed":
            assert rows[rid]["charged"] == hold.charged
    assert not [r for rid, r in rows.items() if rid not in model.holds and r["status"] == "held"]
    usage = [e for e in entries if e["reference"].startswith("reservation:")]
    assert (
        len(usage)
        == len({e["reference"] for e in usage})
        == len([x for x in model.holds.values() if x.state == "committed" and x.charged > 0])
    )
    available, held = await h.runtime.mirror.live(user)
    assert available >= 0
    # A hold whose end never reached Redis still counts there until its deadline or the sweeper's
    # pass (the clock moves in whole seconds, as do TTLs, so "not past" means "at or before").
    if any(model.holds[rid].expires_at >= h.clock.now for rid in model.unsynced):
        assert held >= model.held and available <= model.balance - model.held, (available, held, model)
    else:
        assert held == model.held and available == model.balance - model.held, (available, held, model)


@pytest.fixture(scope="module")
def prop_database_url(make_database_url: Any) -> str:
    return str(make_database_url("credits_prop"))


@pytest.mark.both_redis
def test_random_interleavings_keep_the_invariants(
    prop_database_url: str, redis_url: str, redis_cluster: bool
) -> None:
    dsn = make_url(prop_database_url).set(drivername="postgresql").render_as_string(hide_password=False)

    # Fewer examples on the cluster: the same programs, each paying for a cluster client's start.
    @settings(
        max_examples=50 if redis_cluster else 150,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @given(ops=program)
    def run(ops: list[Any]) -> None:
        async def main() -> None:
            h = Harness(prop_database_url, redis_url, redis_cluster)
            await h.start()
            pg = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
            try:
                await run_program(h, pg, ops)
            finally:
                await pg.close()
                await h.stop()
                await h.redis.aclose()

        # The test's own event loop is the session loop; the program gets a fresh one in a thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, main()).result()

    run()
