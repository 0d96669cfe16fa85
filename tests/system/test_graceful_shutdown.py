"""Graceful shutdown of the gateway: on SIGTERM it stops taking new work, finishes the request in
flight, and settles its hold before exiting (issue 6), so a deploy never loses or double-charges."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.standin import StandinServer, run_in_thread
from tests.support.credits_service import CreditsService, running_credits
from tests.support.servers import free_port, service_process

INTERNAL = {"Authorization": "Bearer dev-internal-token"}


@pytest.fixture(scope="module")
async def credits(make_database_url, redis_url, broker_namespace) -> AsyncIterator[CreditsService]:  # type: ignore[no-untyped-def]
    async with running_credits(
        database_url=make_database_url("shutdown_credits"),
        redis_url=redis_url,
        broker_namespace=f"{broker_namespace}-shutdown",
    ) as service:
        yield service


@pytest.fixture(scope="module")
def upstream() -> Any:
    with run_in_thread() as server:
        yield server


async def account(credits: CreditsService, user: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=credits.url, headers=INTERNAL) as c:
        r = await c.get(f"/v1/users/{user}/credits")
        assert r.status_code == 200, r.text
        return dict(r.json())


async def test_sigterm_finishes_the_request_in_flight_and_settles_it(
    credits: CreditsService, upstream: StandinServer, redis_url: str, broker_namespace: str, tmp_path: Any
) -> None:
    user = "shutdown-user"
    async with httpx.AsyncClient(base_url=credits.url, headers=INTERNAL) as c:
        assert (await c.post("/v1/users", json={"user_id": user})).status_code in (200, 201)
    before = await account(credits, user)

    env = {
        "CREDITS_URL": credits.url,
        "BILLING_URL": f"http://127.0.0.1:{free_port()}",
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "test",
        "REDIS_URL": redis_url,
        "BROKER_NAMESPACE": f"{broker_namespace}-shutdown",
        "LOG_JSON": "false",
    }
    # The proxy's readiness asks credits, which runs on this event loop: wait for it off the loop.
    process = service_process("services.proxy", env, log_path=tmp_path / "proxy.log")
    url, proc = await asyncio.to_thread(process.__enter__)
    try:
        as_user = {**INTERNAL, "X-User-Id": user}
        body = {"model": "standin-slow-1500", "messages": [{"role": "user", "content": "slow one"}]}
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            in_flight = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=as_user))
            await asyncio.sleep(0.5)  # the request is now waiting on the upstream
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)

            # No new work is taken once shutdown has begun...
            with pytest.raises(httpx.TransportError):
                async with httpx.AsyncClient(base_url=url, timeout=5) as fresh:
                    await fresh.post("/v1/chat/completions", json=body, headers=as_user)

            # ...but the request in flight is served.
            response = await in_flight
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
        assert response.headers["x-credits-charged"] == "1"

        # uvicorn re-raises the signal once its graceful shutdown is complete.
        exit_code = await asyncio.to_thread(proc.wait, 30)
        log_text = (tmp_path / "proxy.log").read_text()
        assert exit_code in (0, -signal.SIGTERM), log_text[-3000:]
        assert "Application shutdown complete" in log_text
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(process.__exit__, None, None, None)

    # The hold was committed before the process exited: charged once, nothing left held.
    after = await account(credits, user)
    assert after["credits_remaining"] == before["credits_remaining"] - 1
    assert after["credits_reserved"] == 0
    async with httpx.AsyncClient(base_url=credits.url, headers=INTERNAL) as c:
        entries = (await c.get(f"/v1/users/{user}/transactions")).json()["data"]
    assert [e["amount"] for e in entries if e["type"] == "usage"] == [-1]
