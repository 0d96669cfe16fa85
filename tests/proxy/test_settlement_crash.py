"""A proxy process killed while its settlement batch is in flight: the request was served, credits
never heard of its commit, so the hold expires back to the user — no charge, no phantom hold, and
the ledger stays consistent. With holds placed in Redis (the fast path) the batch in flight is the
hold's record itself: credits finds it beside the hold in Redis after the deadline, records it and
expires it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.credits.app import create_app as create_credits_app
from services.credits.config import CreditsSettings
from services.standin import StandinServer
from tests.conftest import eventually
from tests.support.servers import serve_app, service_process

INTERNAL = {"authorization": "Bearer dev-internal-token"}


def _front(credits_url: str, batches: list[bytes]) -> Starlette:
    """Forwards every call to credits, except settlement batches: those are recorded and never answered."""

    async def forward(request: Request) -> Response:
        body = await request.body()
        if request.url.path == "/v1/reservations/batch":
            batches.append(body)
            await asyncio.sleep(3600)
        headers = {k: v for k, v in request.headers.items() if k in ("authorization", "content-type")}
        async with httpx.AsyncClient(base_url=credits_url, timeout=30) as http:
            r = await http.request(
                request.method, request.url.path, params=request.query_params, content=body, headers=headers
            )
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    methods = ["GET", "POST", "DELETE"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


@pytest.mark.parametrize("holds_via", ["http", "redis"])
async def test_proxy_killed_before_its_settlement_reaches_credits_charges_nothing(  # type: ignore[no-untyped-def]
    make_database_url, redis_url, rabbitmq_url, broker_namespace, standin: StandinServer, holds_via: str
) -> None:
    settings = CreditsSettings(
        database_url=make_database_url(f"settle_crash_{holds_via}"),
        redis_namespace=f"credits-crash-{os.urandom(3).hex()}",
        orphan_grace_seconds=0.5,
        redis_url=redis_url,
        rabbitmq_url=rabbitmq_url,
        broker_namespace=broker_namespace,
        signup_credits=5,
        reservation_ttl_seconds=2,
        sweep_interval_seconds=0.2,
        run_consumer=False,
    )
    batches: list[bytes] = []
    async with (
        serve_app(create_credits_app(settings)) as credits_url,
        serve_app(_front(credits_url, batches)) as front_url,
        httpx.AsyncClient(base_url=credits_url, headers=INTERNAL, timeout=30) as credits,
    ):
        user_id = f"u-crash-{os.urandom(4).hex()}"
        assert (await credits.post("/v1/users", json={"user_id": user_id})).status_code == 201
        env = {
            "CREDITS_URL": front_url,
            "OPENAI_BASE_URL": standin.base_url,
            "OPENAI_API_KEY": "sk-test",
            "REDIS_URL": redis_url,
            "RABBITMQ_URL": rabbitmq_url,
            "BROKER_NAMESPACE": broker_namespace,
            "WORKER_ENABLED": "0",
            "LOG_LEVEL": "WARNING",
            "HOLDS_IN_REDIS": "1" if holds_via == "redis" else "0",
            "REDIS_NAMESPACE": settings.redis_namespace,
            "RESERVATION_TTL_SECONDS": "2",
        }
        # Started from a thread: its readiness wait blocks, and credits and the front run in this loop.
        stack = contextlib.ExitStack()
        proxy_url, proc = await asyncio.to_thread(stack.enter_context, service_process("services.proxy", env))
        try:
            async with httpx.AsyncClient(base_url=proxy_url, timeout=30) as gateway:
                r = await gateway.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    headers={**INTERNAL, "x-user-id": user_id},
                )
            assert r.status_code == 200, r.text
            assert r.headers["x-credits-charged"] == "1"
            await eventually(lambda: bool(batches), timeout=20)  # the settlement is on its way...
            held = (await credits.get(f"/v1/users/{user_id}/credits")).json()
            assert held["credits_reserved"] == 1 and held["credits_remaining"] == 4
            os.killpg(proc.pid, signal.SIGKILL)  # ...and its sender dies before credits answers it
            await asyncio.to_thread(proc.wait, 10)
        finally:
            await asyncio.to_thread(stack.close)

        async def returned() -> dict[str, Any] | None:
            account = (await credits.get(f"/v1/users/{user_id}/credits")).json()
            ok = account["credits_reserved"] == 0 and account["credits_remaining"] == 5
            return account if ok else None

        account = await eventually(returned, timeout=30)
        assert account["credits_lifetime_used"] == 0
        ledger = (await credits.get(f"/v1/users/{user_id}/transactions")).json()["data"]
        assert [(e["type"], e["amount"]) for e in ledger] == [("signup_bonus", 5)]
        (item,) = orjson.loads(batches[0])["items"]
        rid = item["reservation_id"]
        if holds_via == "redis":
            # The record the proxy never delivered was beside the hold in Redis: credits recorded it
            # from there when it met the hold past its deadline, and expired it (its settlement died
            # with the proxy).
            assert item["action"] == "hold"
        else:
            assert item["action"] == "commit"

        async def expired() -> bool:
            return bool((await credits.get(f"/v1/reservations/{rid}")).json()["status"] == "expired")

        await eventually(expired, timeout=10)
