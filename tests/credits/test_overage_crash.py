"""A real credits process SIGKILLed after a commit's transaction and before its overage was charged: the
commit delivered again to the restarted service is a replay, which charges the overage, once.

The process is stopped at that point for certain: the test holds an uncommitted `overage_charges` row
for the hold, so the overage's transaction (after the Redis hold of its own is placed) waits on the test's
until the process is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Callable

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from tests.conftest import eventually
from tests.support.servers import service_process

HEADERS = {"Authorization": "Bearer dev-internal-token"}
# The overage's transaction waits on the test's (its lock of the account row, taken first, waits on the
# test's row, whose reference to the account holds a key-share lock on it).
WAITING_ON_THE_TEST = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


async def test_sigkill_between_a_commit_and_its_overage(
    make_database_url: Callable[[str], str], redis_url: str, broker_namespace: str
) -> None:
    database_url = make_database_url("credits_overage_crash")
    # Its own Redis namespace: the two processes (before and after the kill) share it, no other does.
    namespace = f"credits-overage-crash-{uuid.uuid4().hex[:6]}"
    env = dict(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        REDIS_NAMESPACE=namespace,
        BROKER_NAMESPACE=broker_namespace,
    )
    user = f"crash-{uuid.uuid4().hex[:8]}"
    commit = {"amount": 4, "overage": 3}
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with service_process("services.credits", env) as (url, proc):
        pg = await asyncpg.connect(dsn)
        blocker = await asyncpg.connect(dsn)
        try:
            async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=30) as c:
                assert (await c.post("/v1/users", json={"user_id": user})).status_code == 201  # 10 credits
                r = await c.post("/v1/reservations", json={"user_id": user, "amount": 4})
                assert r.status_code == 201, r.text
                rid = str(r.json()["reservation_id"])
                blocking = blocker.transaction()
                await blocking.start()
                await blocker.execute(
                    "INSERT INTO overage_charges (reservation_id, user_id, credits, taken, owed) "
                    "VALUES ($1::uuid, $2, 0, 0, 0)",
                    rid,
                    user,
                )
                sent = asyncio.create_task(c.post(f"/v1/reservations/{rid}/commit", json=commit))

                async def waiting() -> bool:
                    return bool(await pg.fetchval(WAITING_ON_THE_TEST) == 1)

                await eventually(waiting, timeout=15)
                assert await pg.fetchval("SELECT status FROM reservations WHERE id = $1::uuid", rid) == (
                    "committed"
                )
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                assert isinstance((await asyncio.gather(sent, return_exceptions=True))[0], httpx.HTTPError)
                await blocking.rollback()
        finally:
            await blocker.close()
            await pg.close()

    pg = await asyncpg.connect(dsn)
    try:
        account = "SELECT balance, credits_owed, credits_lifetime_used FROM accounts WHERE user_id = $1"
        # Left by the dead process: the commit, not its overage.
        assert tuple(await pg.fetchrow(account, user)) == (6, 0, 4)
        with service_process("services.credits", env) as (url, _):
            async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=30) as c:
                again = await c.post(f"/v1/reservations/{rid}/commit", json=commit)
                assert again.status_code == 200, again.text
                # The dead process's own overage hold (3) lives on until it expires: the 3 left are taken.
                assert (again.json()["charged"], again.json()["overage"], again.json()["owed"]) == (4, 3, 0)
                third = await c.post(f"/v1/reservations/{rid}/commit", json=commit)
                assert third.status_code == 200 and "overage" not in third.json()
        assert tuple(await pg.fetchrow(account, user)) == (3, 0, 7)
        usage = await pg.fetch(
            "SELECT reference, amount FROM ledger_entries WHERE user_id = $1 AND type = 'usage' ORDER BY id",
            user,
        )
        assert [tuple(e) for e in usage] == [
            (f"reservation:{rid}:commit", -4),
            (f"reservation:{rid}:overage", -3),
        ]
        charges = await pg.fetch(
            "SELECT credits, taken, owed FROM overage_charges WHERE reservation_id = $1::uuid", rid
        )
        assert [tuple(r) for r in charges] == [(3, 3, 0)]
    finally:
        await pg.close()
