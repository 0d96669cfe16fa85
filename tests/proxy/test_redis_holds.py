"""The proxy's fast path: holds placed straight in credits' Redis, recorded at credits afterwards.

A credits outage only delays the record (the request is still charged once); an unreachable Redis
falls back to credits' HTTP reserve. (Racing placements from several clients against one balance are
tested at credits: tests/credits/test_recorded_holds.py.)"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.proxy.standin import StandinServer, run_in_thread
from tests.proxy.conftest import Credits
from tests.support.proxy_service import RunningProxy, running_proxy
from tests.support.servers import serve_app


@pytest.fixture(scope="module")
def own_standin() -> Iterator[StandinServer]:
    """An upstream of this module's own: the session's stand-in has just served the other modules' bursts."""
    with run_in_thread() as server:
        yield server


def _placed(via: str) -> float:
    return REGISTRY.get_sample_value("proxy_holds_placed_total", {"via": via}) or 0.0


@contextlib.asynccontextmanager
async def _another_proxy(
    credits_url: str, standin: StandinServer, pricing_file: str, **overrides: Any
) -> AsyncIterator[RunningProxy]:
    async with running_proxy(
        credits_url=credits_url,
        upstream_base_url=standin.base_url,
        pricing_file=pricing_file,
        worker_enabled=False,
        **overrides,
    ) as running:
        yield running


def _client(proxy: RunningProxy, user_id: str) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=proxy.base_url,
        api_key="dev-internal-token",
        default_headers={"X-User-Id": user_id},
        max_retries=0,
        timeout=120,
    )


def _flaky_front(credits_url: str, outage: dict[str, int]) -> Starlette:
    """Forwards to credits, but answers the first `outage["batches"]` settlement batches with 503."""

    async def forward(request: Request) -> Response:
        body = await request.body()
        if request.url.path == "/v1/reservations/batch" and outage["batches"] > 0:
            outage["batches"] -= 1
            return Response(
                b'{"error":{"type":"api_error","code":"service_unavailable","message":"down"}}', 503
            )
        headers = {k: v for k, v in request.headers.items() if k in ("authorization", "content-type")}
        async with httpx.AsyncClient(base_url=credits_url, timeout=30) as http:
            r = await http.request(
                request.method, request.url.path, params=request.query_params, content=body, headers=headers
            )
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST", "DELETE"])])


async def test_credits_down_while_recording_delays_the_record_and_charges_once(  # type: ignore[no-untyped-def]
    credits: Credits, credits_url, own_standin, pricing_file, redis_url
) -> None:
    user = await credits.user(10)
    outage = {"batches": 3}
    async with (
        serve_app(_flaky_front(credits_url, outage)) as front,
        _another_proxy(front, own_standin, pricing_file, redis_url=redis_url) as gateway,
    ):
        redis_before = _placed("redis")
        completion = await _client(gateway, user).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.headers["x-credits-charged"] == "1"
        assert completion.headers["x-credits-remaining"] == "9"
        assert _placed("redis") - redis_before == 1
        account = await credits.settled(user, 9, usage_total=1)
        assert outage["batches"] == 0  # the record was refused three times before it went through
    assert account["credits_lifetime_used"] == 1
    assert await credits.usage(user) == [1]


async def test_unreachable_redis_falls_back_to_credits_http_reserve(  # type: ignore[no-untyped-def]
    credits: Credits, credits_url, own_standin, pricing_file
) -> None:
    user = await credits.user(3)
    async with _another_proxy(
        credits_url, own_standin, pricing_file, redis_url="redis://127.0.0.1:9/0"
    ) as gateway:
        http_before = _placed("http")
        client = _client(gateway, user)
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        try:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            raise AssertionError("a fourth request on 3 credits was served")
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
        assert _placed("http") - http_before == 4
    await credits.settled(user, 0, usage_total=3)
