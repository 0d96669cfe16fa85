"""`make run` on this machine: the whole system comes up, sells a pack in test mode, serves a chat
completion through the gateway, and Ctrl-C leaves no process behind. The tests give it their own
databases, Redis namespace and broker names, so they never write into what a developer's `make run` uses."""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import openai
import pytest

from tests.support.make_run import (
    INTERNAL,
    PORTS,
    assert_ports_free,
    ctrl_c,
    database_dsn,
    drop_databases,
    own_databases,
    port_in_use,
    processes_with_marker,
    start_system,
    system_env,
    wait_ready,
    wait_until,
)


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def accounts_named(database: str, user_id: str) -> int:
    """How many accounts `user_id` has in one database of this PostgreSQL (0 if there is no such database)."""

    async def count() -> int:
        try:
            conn = await asyncpg.connect(database_dsn(database))
        except asyncpg.InvalidCatalogNameError:
            return 0
        try:
            return int(await conn.fetchval("SELECT count(*) FROM accounts WHERE user_id = $1", user_id))
        except asyncpg.UndefinedTableError:
            return 0
        finally:
            await conn.close()

    return asyncio.run(count())


def assert_stopped_in_order(log: str) -> None:
    """The gateway was gone before any service it depends on began to stop."""
    assert "stopped proxy" in log, log[-3000:]
    proxy_gone = log.index("stopped proxy")
    for name in ("credits", "billing", "upstream"):
        # uvicorn's first shutdown line, as make run prefixes it with the service's name.
        begun = re.search(rf"^\s*{name} \| .*Shutting down", log, re.MULTILINE)
        assert begun is None or begun.start() > proxy_gone, f"{name} began stopping before the proxy was gone"


def test_make_run_purchase_chat_and_clean_stop(tmp_path: Path, run_id: str) -> None:
    assert_ports_free()
    marker = uuid.uuid4().hex
    settings = own_databases(run_id, "makerun")
    env = system_env(marker, settings)
    log_path = tmp_path / "make-run.log"
    proc = start_system(["make", "--no-print-directory", "run"], env, log_path)
    try:

        def all_ready() -> bool:
            assert proc.poll() is None, "make run exited early:\n" + log_path.read_text()[-4000:]
            return all(ready(PORTS[s]) for s in ("credits", "billing", "proxy"))

        try:
            wait_until(all_ready, 150, "readyz")
        except AssertionError:
            raise AssertionError(
                "services not ready; make run printed:\n" + log_path.read_text()[-4000:]
            ) from None
        wait_until(
            lambda: "Portal, signed in as demo-user" in log_path.read_text(), 10, "the start-up banner"
        )

        user = f"makerun-{uuid.uuid4().hex[:8]}"
        as_user = {**INTERNAL, "X-User-Id": user}
        gateway = "http://127.0.0.1:8000"
        start = httpx.get(f"{gateway}/v1/account", headers=as_user).json()["credits_remaining"]
        assert start == 10  # signup credits

        # A purchase in local test mode: checkout URL → the TEST MODE page → Pay.
        checkout = httpx.post(f"{gateway}/v1/account/checkout", json={"pack": "starter"}, headers=as_user)
        assert checkout.status_code in (200, 201), checkout.text
        page = httpx.get(checkout.json()["url"])
        assert "TEST MODE" in page.text.upper()
        paid = httpx.post(checkout.json()["url"] + "/pay", follow_redirects=False)
        assert paid.status_code in (302, 303), paid.text
        wait_until(
            lambda: httpx.get(f"{gateway}/v1/account", headers=as_user).json()["credits_remaining"] == 110,
            30,
            "the starter pack's 100 credits",
        )

        # A chat completion through the gateway with the official SDK, charged one credit.
        client = openai.OpenAI(
            base_url=f"{gateway}/v1", api_key="dev-internal-token", default_headers={"X-User-Id": user}
        )
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.choices[0].message.content
        client.close()
        wait_until(
            lambda: httpx.get(f"{gateway}/v1/account", headers=as_user).json()["credits_remaining"] == 109,
            15,
            "the chat to be charged",
        )
        assert processes_with_marker(marker), "the marker should find the running system"

        # Everything landed in the test's own database, nothing in make run's default one.
        assert accounts_named(settings["CREDITS_DATABASE_URL"].rsplit("/", 1)[1], user) == 1
        assert accounts_named("credit_proxy_credits", user) == 0
    finally:
        if not ctrl_c(proc, timeout=60):
            pytest.fail("make run did not stop within 60 s of Ctrl-C")

    deadline = time.monotonic() + 10
    while processes_with_marker(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_marker(marker) == [], (
        "processes left behind after Ctrl-C:\n" + log_path.read_text()[-2000:]
    )
    assert [p for p in PORTS.values() if port_in_use(p)] == []
    assert "stopping" in log_path.read_text()
    assert_stopped_in_order(log_path.read_text())
    drop_databases(settings)


def test_ctrl_c_stops_the_gateway_first_and_leaves_nothing_within_seconds(
    tmp_path: Path, run_id: str
) -> None:
    """Ctrl-C of deploy/run.py, three times over, each right after a served request whose settlement is
    still queued in the proxy: every process is gone within a few seconds, the proxy went first (so
    its last settlement still reached credits), and the request was charged exactly once."""
    assert_ports_free()
    settings = own_databases(run_id, "ctrlc")
    try:
        for attempt in range(3):
            marker = uuid.uuid4().hex
            # Settlements linger long enough that Ctrl-C finds one queued.
            env = {**system_env(marker, settings), "SETTLE_LINGER_MS": "1000"}
            log_path = tmp_path / f"run-{attempt}.log"
            proc = start_system([sys.executable, "deploy/run.py"], env, log_path)
            try:
                wait_ready(proc, log_path)
                user = f"ctrlc-{attempt}-{uuid.uuid4().hex[:6]}"
                as_user = {**INTERNAL, "X-User-Id": user}
                gateway = "http://127.0.0.1:8000"
                assert httpx.get(f"{gateway}/v1/account", headers=as_user).json()["credits_remaining"] == 10
                chat = httpx.post(
                    f"{gateway}/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    headers=as_user,
                    timeout=30,
                )
                assert chat.status_code == 200 and chat.headers["x-credits-charged"] == "1", chat.text
            finally:
                stopped_at = time.monotonic()
                ctrl_c(proc, timeout=30)
            while processes_with_marker(marker) and time.monotonic() - stopped_at < 30:
                time.sleep(0.1)
            took = time.monotonic() - stopped_at
            text = log_path.read_text()
            assert processes_with_marker(marker) == [], "left behind after Ctrl-C:\n" + text[-3000:]
            assert took < 8, f"attempt {attempt}: stopping took {took:.1f} s\n" + text[-3000:]
            assert [p for p in PORTS.values() if port_in_use(p)] == []
            assert_stopped_in_order(text)
            # The settlement queued at Ctrl-C reached credits before it stopped: charged exactly once.
            usage = credits_usage(settings["CREDITS_DATABASE_URL"].rsplit("/", 1)[1], user)
            assert usage == [-1], text[-3000:]
    finally:
        drop_databases(settings)


def credits_usage(database: str, user_id: str) -> list[int]:
    async def amounts() -> list[int]:
        conn = await asyncpg.connect(database_dsn(database))
        try:
            rows = await conn.fetch(
                "SELECT amount FROM ledger_entries WHERE user_id = $1 AND type = 'usage'", user_id
            )
            return [int(r["amount"]) for r in rows]
        finally:
            await conn.close()

    return asyncio.run(amounts())
