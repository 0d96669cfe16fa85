"""Outages with several real processes: credits processes killed under load (one, then all of them for
several hold lifetimes) and a proxy stopped while credits is gone. Whatever happens, what the upstream
served is what the ledger charged, exactly once, never more than the balance, and nothing stays held.

Every service here is a real process (`python -m services.credits` / `services.proxy`) on one
database, one Redis namespace and one broker namespace; the stand-in upstream runs in this process and
counts what it served (a model name of its own per test)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from services.standin import StandinServer
from tests.conftest import eventually
from tests.support.servers import free_port, service_process

INTERNAL = {"authorization": "Bearer dev-internal-token"}
ADMIN = {"authorization": "Bearer dev-admin-token"}
TTL = 2  # RESERVATION_TTL_SECONDS: short, so an outage of a few seconds outlives several holds


@dataclass
class Deployment:
    """Credits and proxy processes of one deployment; each credits process keeps its port across restarts."""

    credits_env: dict[str, str]
    proxy_env: dict[str, str]
    credits_ports: list[int]
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    credits: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    proxies: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def credits_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.credits_ports]

    async def start_credits(self, i: int) -> None:
        context = service_process("services.credits", self.credits_env, port=self.credits_ports[i])
        _, proc = await asyncio.to_thread(self.stack.enter_context, context)
        self.credits[i] = proc

    async def start_proxy(self, **env: str) -> tuple[str, subprocess.Popen[bytes]]:
        context = service_process("services.proxy", {**self.proxy_env, **env})
        started: tuple[str, subprocess.Popen[bytes]] = await asyncio.to_thread(
            self.stack.enter_context, context
        )
        self.proxies.append(started)
        return started

    async def signal_credits(self, i: int, sig: signal.Signals) -> None:
        proc = self.credits[i]
        os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            await asyncio.to_thread(proc.wait, 10)


@contextlib.asynccontextmanager
async def deployment(
    make_database_url: Callable[[str], str],
    redis_url: str,
    broker_namespace: str,
    standin: StandinServer,
    name: str,
    credits_processes: int,
) -> AsyncIterator[Deployment]:
    database_url = make_database_url(f"outage_{name}")
    namespace = f"credits-outage-{uuid.uuid4().hex[:8]}"
    ports = [free_port() for _ in range(credits_processes)]
    common = {
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": namespace,
        "BROKER_NAMESPACE": broker_namespace,
        "RESERVATION_TTL_SECONDS": str(TTL),
        "LOG_LEVEL": "WARNING",
    }
    credits_env = {
        **common,
        "DATABASE_URL": database_url,
        "SIGNUP_CREDITS": "0",
        "SWEEP_INTERVAL_SECONDS": "0.2",
        "ORPHAN_GRACE_SECONDS": "1",
        "DB_POOL_SIZE": "4",
    }
    proxy_env = {
        **common,
        "CREDITS_URL": ",".join(f"http://127.0.0.1:{port}" for port in ports),
        "OPENAI_BASE_URL": standin.base_url,
        "OPENAI_API_KEY": "sk-test",
        "WORKER_ENABLED": "0",
        "HOLDS_IN_REDIS": "1",
        "DOWNSTREAM_TIMEOUT_SECONDS": "2",
        "SHUTDOWN_GRACE_SECONDS": "5",
    }
    deploy = Deployment(credits_env, proxy_env, ports)
    try:
        # One after the other: the first applies the migrations.
        for i in range(credits_processes):
            await deploy.start_credits(i)
        yield deploy
    finally:
        await asyncio.to_thread(deploy.stack.close)


async def new_user(credits_url: str, credits: int) -> str:
    user = f"outage-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=credits_url, timeout=30) as c:
        assert (await c.post("/v1/users", json={"user_id": user}, headers=INTERNAL)).status_code == 201
        r = await c.post(
            f"/v1/admin/users/{user}/grants",
            json={"credits": credits, "reason": "outage test"},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
    return user


@dataclass
class Load:
    """Clients sending chats to the proxies in turn, as fast as they are answered (with a short pause)."""

    user: str
    model: str
    proxy_urls: list[str]
    statuses: dict[int, int] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def served(self) -> int:
        return self.statuses.get(200, 0)

    async def client(self, n: int) -> None:
        body = {"model": self.model, "messages": [{"role": "user", "content": "hi"}]}
        headers = {**INTERNAL, "x-user-id": self.user}
        async with httpx.AsyncClient(timeout=30) as http:
            i = n
            while not self.stop.is_set():
                url = self.proxy_urls[i % len(self.proxy_urls)]
                i += 1
                try:
                    r = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0
                self.statuses[status] = self.statuses.get(status, 0) + 1
                await asyncio.sleep(0.02)

    @contextlib.asynccontextmanager
    async def running(self, clients: int) -> AsyncIterator[Load]:
        tasks = [asyncio.create_task(self.client(n)) for n in range(clients)]
        try:
            yield self
        finally:
            self.stop.set()
            await asyncio.gather(*tasks)


async def first_settled(credits_url: str, user: str) -> None:
    """Waits until the user's first request is charged at credits: its hold recorded, then committed
    (two batches, each lingering), so no send of it is still under way when credits goes away."""
    async with httpx.AsyncClient(base_url=credits_url, headers=INTERNAL, timeout=30) as c:

        async def charged() -> bool:
            account = (await c.get(f"/v1/users/{user}/credits")).json()
            return bool(account["credits_lifetime_used"] == 1 and account["credits_reserved"] == 0)

        await eventually(charged, timeout=15)


async def assert_ledger(credits_url: str, database_url: str, user: str, granted: int, served: int) -> None:
    """What the upstream served was charged exactly once, within the balance, and nothing stays held."""
    async with httpx.AsyncClient(base_url=credits_url, headers=INTERNAL, timeout=30) as c:

        async def settled() -> dict[str, Any] | None:
            account: dict[str, Any] = (await c.get(f"/v1/users/{user}/credits")).json()
            return account if account["credits_reserved"] == 0 else None

        account = await eventually(settled, timeout=40, interval=0.3)
    assert isinstance(account, dict)
    assert served <= granted  # no overspend
    assert account["credits_lifetime_used"] == served  # every served request charged, once
    assert account["credits_remaining"] == granted - served
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    pg = await asyncpg.connect(dsn)
    try:
        entries = await pg.fetch("SELECT reference, amount FROM ledger_entries WHERE user_id = $1", user)
        references = [e["reference"] for e in entries]
        assert len(references) == len(set(references))
        assert sum(e["amount"] for e in entries) == granted - served
        assert sum(1 for e in entries if e["amount"] < 0) == served  # one usage entry per request
        held = await pg.fetchval(
            "SELECT count(*) FROM reservations WHERE user_id = $1 AND status = 'held'", user
        )
        assert held == 0
    finally:
        await pg.close()


def served_upstream(standin: StandinServer, model: str) -> int:
    return int(standin.app.stats.by_model[model])


async def test_one_credits_process_killed_under_load_and_restarted(  # type: ignore[no-untyped-def]
    make_database_url, redis_url, broker_namespace, standin: StandinServer
) -> None:
    granted = 150
    async with deployment(make_database_url, redis_url, broker_namespace, standin, "kill_one", 2) as deploy:
        user = await new_user(deploy.credits_urls[0], granted)
        proxies = [(await deploy.start_proxy())[0] for _ in range(3)]
        model = f"outage-{uuid.uuid4().hex[:6]}"
        load = Load(user, model, proxies)
        async with load.running(clients=6):
            await eventually(lambda: load.served >= 20, timeout=30)
            await deploy.signal_credits(0, signal.SIGKILL)
            killed_at = load.served
            await eventually(lambda: load.served >= killed_at + 20, timeout=30)  # still serving
            await deploy.start_credits(0)
            restarted_at = load.served
            # On until the balance is spent (or plenty served after the restart).
            await eventually(
                lambda: load.statuses.get(402, 0) >= 20 or load.served >= restarted_at + 40, timeout=60
            )
        assert load.served > killed_at  # the other credits process kept the proxies going
        assert served_upstream(standin, model) == load.served
        await assert_ledger(
            deploy.credits_urls[1], deploy.credits_env["DATABASE_URL"], user, granted, load.served
        )


async def test_every_credits_process_down_for_several_hold_lifetimes(  # type: ignore[no-untyped-def]
    make_database_url, redis_url, broker_namespace, standin: StandinServer
) -> None:
    granted = 80
    async with deployment(make_database_url, redis_url, broker_namespace, standin, "all_down", 2) as deploy:
        user = await new_user(deploy.credits_urls[0], granted)
        proxies = [(await deploy.start_proxy())[0] for _ in range(3)]
        model = f"outage-{uuid.uuid4().hex[:6]}"
        load = Load(user, model, proxies)
        async with load.running(clients=6):
            await eventually(lambda: load.served >= 15, timeout=30)
            await deploy.signal_credits(0, signal.SIGKILL)
            await deploy.signal_credits(1, signal.SIGKILL)
            await asyncio.sleep(
                3.5 * TTL
            )  # every hold placed before or during the outage is past its deadline
            during = load.served
            await deploy.start_credits(0)
            await deploy.start_credits(1)
            # On until the balance is spent: credits handed back by mistake would be spent again.
            await eventually(lambda: load.statuses.get(402, 0) >= 30, timeout=60)
        assert load.statuses.get(503, 0) > 0  # the outage was seen: requests were refused, not served blind
        assert load.served > during
        assert served_upstream(standin, model) == load.served
        await assert_ledger(
            deploy.credits_urls[0], deploy.credits_env["DATABASE_URL"], user, granted, load.served
        )
        assert load.served == granted  # and nothing was lost: the whole balance was spent


@pytest.mark.parametrize("outage", ["killed", "hung"])
async def test_proxy_stopped_while_credits_is_down_keeps_what_it_served(  # type: ignore[no-untyped-def]
    make_database_url, redis_url, broker_namespace, standin: StandinServer, outage: str
) -> None:
    granted = 50
    async with deployment(
        make_database_url, redis_url, broker_namespace, standin, f"stop_{outage}", 1
    ) as deploy:
        user = await new_user(deploy.credits_urls[0], granted)
        # Settlements wait long before they leave, so they are queued when credits goes away.
        proxy_url, proxy = await deploy.start_proxy(SETTLE_LINGER_MS="500")
        model = f"outage-{uuid.uuid4().hex[:6]}"
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        headers = {**INTERNAL, "x-user-id": user}
        async with httpx.AsyncClient(base_url=proxy_url, headers=headers, timeout=30) as gateway:
            assert (await gateway.post("/v1/chat/completions", json=body)).status_code == 200
            await first_settled(deploy.credits_urls[0], user)  # the account is loaded in Redis
            await deploy.signal_credits(0, signal.SIGKILL if outage == "killed" else signal.SIGSTOP)
            answers = await asyncio.gather(
                *(gateway.post("/v1/chat/completions", json=body) for _ in range(20)), return_exceptions=True
            )
        served = sum(1 for a in answers if isinstance(a, httpx.Response) and a.status_code == 200) + 1
        assert served > 1
        assert served_upstream(standin, model) == served
        started = time.monotonic()
        os.killpg(proxy.pid, signal.SIGTERM)
        await asyncio.to_thread(proxy.wait, 30)
        # Within its grace period (5 s), with credits gone and settlements queued.
        assert time.monotonic() - started < 5 + 2
        if outage == "hung":
            await deploy.signal_credits(0, signal.SIGKILL)
        await asyncio.sleep(TTL + 1)  # every hold is past its deadline before credits returns
        await deploy.start_credits(0)
        await assert_ledger(deploy.credits_urls[0], deploy.credits_env["DATABASE_URL"], user, granted, served)
