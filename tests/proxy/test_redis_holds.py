"""The proxy's fast path: holds placed straight in credits' Redis, recorded at credits afterwards.

A credits outage only delays the record (the request is still charged once); an unreachable Redis
falls back to credits' HTTP reserve. (Racing placements from several clients against one balance are
tested at credits: tests/credits/test_recorded_holds.py.)"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.standin import StandinServer, run_in_thread
from tests.proxy.conftest import Credits, another_proxy, sdk_for
from tests.support.servers import serve_app


@pytest.fixture(scope="module")
def own_standin() -> Iterator[StandinServer]:
    """An upstream of this module's own: the session's stand-in has just served the other modules' bursts."""
    with run_in_thread() as server:
        yield server


def _placed(via: str) -> float:
    return REGISTRY.get_sample_value("proxy_holds_placed_total", {"via": via}) or 0.0


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


@pytest.mark.both_redis
async def test_credits_down_while_recording_delays_the_record_and_charges_once(  # type: ignore[no-untyped-def]
    credits: Credits, credits_url, own_standin, pricing_file, redis_url, redis_cluster
) -> None:
    user = await credits.user(10)
    outage = {"batches": 3}
    async with (
        serve_app(_flaky_front(credits_url, outage)) as front,
        another_proxy(
            front,
            own_standin.base_url,
            pricing_file=pricing_file,
            redis_url=redis_url,
            redis_cluster=redis_cluster,
        ) as gateway,
    ):
        redis_before = _placed("redis")
        completion = await sdk_for(gateway, user, timeout=120).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.headers["x-credits-charged"] == "1"
        assert completion.headers["x-credits-remaining"] == "9"
        assert _placed("redis") - redis_before == 1
        account = await credits.settled(user, 9, usage_total=1)
        # The record was refused once; the proxy then parked it and the commit in credits' Redis (no
        # retries from its memory), and credits applied both from there.
        assert outage["batches"] == 2
    assert account["credits_lifetime_used"] == 1
    assert await credits.usage(user) == [1]


async def test_unreachable_redis_falls_back_to_credits_http_reserve(  # type: ignore[no-untyped-def]
    credits: Credits, credits_url, own_standin, pricing_file
) -> None:
    user = await credits.user(3)
    async with another_proxy(
        credits_url, own_standin.base_url, pricing_file=pricing_file, redis_url="redis://127.0.0.1:9/0"
    ) as gateway:
        http_before = _placed("http")
        client = sdk_for(gateway, user, timeout=120)
        for _ in range(3):
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        try:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            raise AssertionError("a fourth request on 3 credits was served")
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
        assert _placed("http") - http_before == 4
    await credits.settled(user, 0, usage_total=3)


async def test_redis_that_never_answers_falls_back_and_charges_once(  # type: ignore[no-untyped-def]
    credits: Credits, credits_url, own_standin, pricing_file
) -> None:
    """A Redis that takes the connection and the command but never answers: the request waits at
    most the fast path's answer timeout, then credits' HTTP reserve serves it; charged once."""
    import asyncio

    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while await reader.read(65536):
            pass  # swallows the handshake and the script call alike

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    user = await credits.user(3)
    try:
        async with another_proxy(
            credits_url,
            own_standin.base_url,
            pricing_file=pricing_file,
            redis_url=f"redis://127.0.0.1:{port}/0",
        ) as gateway:
            gateway.app.state.proxy.meter.redis_holds.answer_timeout_seconds = 0.5
            http_before = _placed("http")
            client = sdk_for(gateway, user, timeout=120)
            for _ in range(2):
                await client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
                )
            assert _placed("http") - http_before == 2
            assert connections  # Redis was really tried
    finally:
        server.close()
        for writer in connections:
            writer.close()
    await credits.settled(user, 1, usage_total=2)


async def test_a_hold_whose_record_was_parked_still_lives_while_its_stream_is_served(  # type: ignore[no-untyped-def]
    credits: Credits, credits_url, own_standin, redis_url
) -> None:
    """Credits missed the record of a hold placed in Redis (parked there for credits to apply), and the
    request streams on for longer than the hold's lifetime: the proxy keeps moving the deadline on once
    credits has the record, so the hold does not lapse (its credits spendable again) mid-stream."""
    user = await credits.user(5)
    outage = {"batches": 1}
    async with (
        serve_app(_flaky_front(credits_url, outage)) as front,
        another_proxy(front, own_standin.base_url, redis_url=redis_url, reservation_ttl_seconds=2) as gateway,
    ):
        stream = await sdk_for(gateway, user, timeout=60).chat.completions.create(
            model="standin-trickle-100-words-60", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        words = 0
        reserved_late_in_the_stream = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                words += 1
                if words == 50:  # about 5 s in: more than twice the TTL past the hold's placement
                    reserved_late_in_the_stream = (await credits.account(user))["credits_reserved"]
        assert words == 60
        assert outage["batches"] == 0  # the record's batch was refused, so it was parked
        assert reserved_late_in_the_stream == 1
        await credits.settled(user, 4, usage_total=1)
