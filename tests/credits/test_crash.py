"""The credits service killed with SIGKILL mid-flight and restarted: every acknowledged hold is in
PostgreSQL and ends exactly once (committed, or expired back); the ledger stays consistent."""

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


async def test_sigkill_while_reserving(
    make_database_url: Callable[[str], str], redis_url: str, broker_namespace: str, tmp_path: object
) -> None:
    database_url = make_database_url("credits_crash")
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": f"credits-crash-{uuid.uuid4().hex[:6]}",
        "BROKER_NAMESPACE": broker_namespace,
        "SWEEP_INTERVAL_SECONDS": "0.2",
        "ORPHAN_GRACE_SECONDS": "1",
        "LOG_LEVEL": "WARNING",
    }
    headers = {"Authorization": "Bearer dev-internal-token"}
    user = f"crash-{uuid.uuid4().hex[:8]}"
    acknowledged: list[dict[str, object]] = []
    committed: dict[str, int] = {}

    with service_process("services.credits", env) as (url, proc):
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as c:
            assert (await c.post("/v1/users", json={"user_id": user})).status_code == 201
            r = await c.post(
                f"/v1/admin/users/{user}/grants",
                json={"credits": 990, "reason": "crash test"},
                headers={"Authorization": "Bearer dev-admin-token"},
            )
            assert r.status_code == 201

            async def worker(n: int) -> None:
                for i in range(1000):
                    try:
                        r = await c.post(
                            "/v1/reservations",
                            json={"user_id": user, "amount": 1 + (i % 3), "ttl_seconds": 3},
                        )
                    except httpx.HTTPError:
                        return
                    if r.status_code != 201:
                        continue
                    body = r.json()
                    acknowledged.append(body)
                    if (n + i) % 2 == 0:
                        try:
                            c2 = await c.post(f"/v1/reservations/{body['reservation_id']}/commit")
                        except httpx.HTTPError:
                            return
                        if c2.status_code == 200:
                            committed[str(body["reservation_id"])] = int(c2.json()["charged"])

            workers = [asyncio.create_task(worker(n)) for n in range(16)]
            await eventually(lambda: len(acknowledged) >= 60, timeout=30)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            await asyncio.gather(*workers)

    assert len(acknowledged) >= 60
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    pg = await asyncpg.connect(dsn)
    try:
        rows = {
            str(r["id"]): r for r in await pg.fetch("SELECT * FROM reservations WHERE user_id = $1", user)
        }
        # Persisted before it was acknowledged: no acknowledged hold is missing.
        assert {str(a["reservation_id"]) for a in acknowledged} <= set(rows)
        for rid, charged in committed.items():
            assert rows[rid]["status"] == "committed" and rows[rid]["charged"] == charged

        with service_process("services.credits", env) as (url, _):
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as c:

                async def settled() -> bool:
                    open_ = await pg.fetchval(
                        "SELECT count(*) FROM reservations WHERE user_id = $1 AND status = 'held'", user
                    )
                    acct = (await c.get(f"/v1/users/{user}/credits")).json()
                    return open_ == 0 and acct["credits_reserved"] == 0

                await eventually(settled, timeout=30)
                acct = (await c.get(f"/v1/users/{user}/credits")).json()
                # The service still works after the crash.
                r = await c.post("/v1/reservations", json={"user_id": user, "amount": 1})
                assert r.status_code == 201
                await c.post(f"/v1/reservations/{r.json()['reservation_id']}/commit")

        balance = await pg.fetchval("SELECT balance FROM accounts WHERE user_id = $1", user)
        total = await pg.fetchval("SELECT sum(amount) FROM ledger_entries WHERE user_id = $1", user)
        usage = await pg.fetchval(
            "SELECT coalesce(sum(charged), 0) FROM reservations WHERE user_id = $1 AND status = 'committed'",
            user,
        )
        statuses = {
            r["status"] for r in await pg.fetch("SELECT status FROM reservations WHERE user_id = $1", user)
        }
        assert balance == total == 1000 - usage
        assert acct["credits_remaining"] == 1000 - usage + 1 and acct["credits_reserved"] == 0
        assert statuses <= {"committed", "expired", "released"}
        entries = await pg.fetch(
            "SELECT amount, balance_after FROM ledger_entries WHERE user_id = $1 ORDER BY id", user
        )
        running = 0
        for e in entries:
            running += e["amount"]
            assert e["balance_after"] == running
    finally:
        await pg.close()
