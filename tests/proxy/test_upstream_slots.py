"""The upstream connection limit (`UPSTREAM_MAX_CONNECTIONS`) still holds after streamed calls that
failed to open. A failed open must give back exactly the slot it took, and none if it never got one:
one slot too many given back per failure would let the pool send one more request at a time than the
limit, and nothing but the upstream would notice.

Each case makes a few stream opens fail on a fresh pool with a small limit, then opens more streams
at once than the limit against the stand-in, which holds every stream it starts; what the stand-in
counts as started is what reached it concurrently, and it must be exactly the limit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
import pytest

from services.proxy.httpclient import StreamingCall
from services.proxy.upstream import Upstream, UpstreamRejected
from services.standin import StandinServer
from shared.errors import UpstreamError, UpstreamTimeout
from tests.conftest import eventually

LIMIT = 2
FAILURES = 3
# Short, so opens that wait for a head or for a slot give up quickly; long enough for a stand-in in
# this process to answer a stream's head on a loaded machine.
TIMEOUT = 1.0
HELD = "standin-stall-after-1"  # one event, then silence until the client leaves


def chat(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True})


async def open_stream(upstream: Upstream, model: str) -> StreamingCall:
    return await upstream.open_stream("chat.completions", chat(model))


def close(calls: list[StreamingCall]) -> None:
    for call in calls:
        call.close()


async def refused(upstream: Upstream, standin: StandinServer) -> None:
    """The upstream's port is bound but not listening yet: every connect is refused."""
    for _ in range(FAILURES):
        with pytest.raises(UpstreamError, match="unreachable"):
            await open_stream(upstream, "standin")


async def head_timeout(upstream: Upstream, standin: StandinServer) -> None:
    """Connected with a slot, but no response head within the timeout."""
    for _ in range(FAILURES):
        with pytest.raises(UpstreamTimeout):
            await open_stream(upstream, "standin-timeout")


async def error_answer(upstream: Upstream, standin: StandinServer) -> None:
    for _ in range(FAILURES):
        with pytest.raises(UpstreamError):
            await open_stream(upstream, "standin-fail-500")
        with pytest.raises(UpstreamRejected):
            await open_stream(upstream, "standin-fail-429")


async def slot_timeout(upstream: Upstream, standin: StandinServer) -> None:
    """Every slot held by an open stream: further opens time out waiting for one they never got."""
    holders = [await open_stream(upstream, HELD) for _ in range(LIMIT)]
    try:
        waiting = await asyncio.gather(
            *(open_stream(upstream, HELD) for _ in range(FAILURES)), return_exceptions=True
        )
        assert all(isinstance(result, UpstreamTimeout) for result in waiting), waiting
    finally:
        close(holders)


async def cancelled(upstream: Upstream, standin: StandinServer) -> None:
    """The caller goes away (the client disconnected) while the open waits for the head."""
    stats = standin.app.stats
    for _ in range(FAILURES):
        seen = stats.requests["chat.completions"]
        opening = asyncio.create_task(open_stream(upstream, "standin-timeout"))
        await eventually(lambda: stats.requests["chat.completions"] > seen)  # noqa: B023
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening


CASES: dict[str, Callable[[Upstream, StandinServer], Awaitable[None]]] = {
    "refused": refused,
    "head_timeout": head_timeout,
    "error_answer": error_answer,
    "slot_timeout": slot_timeout,
    "cancelled": cancelled,
}


async def streams_reaching_the_upstream_at_once(
    upstream: Upstream, standin: StandinServer
) -> tuple[int, int]:
    """Opens more held streams at once than the limit; (streams the stand-in started, opens that
    succeeded). The opens that found no slot time out waiting, since no held stream ends."""
    streams = standin.app.stats.streams
    before = streams["started"]
    results = await asyncio.gather(
        *(open_stream(upstream, HELD) for _ in range(LIMIT + FAILURES + 2)), return_exceptions=True
    )
    opened = [result for result in results if isinstance(result, StreamingCall)]
    try:
        assert all(isinstance(result, StreamingCall | UpstreamTimeout) for result in results), results
        return streams["started"] - before, len(opened)
    finally:
        close(opened)


@pytest.mark.parametrize("case", list(CASES))
async def test_failed_stream_opens_leave_the_upstream_connection_limit_as_it_was(case: str) -> None:
    with StandinServer() as standin:
        upstream = Upstream(standin.base_url, "test-key", TIMEOUT, LIMIT)
        try:
            if case != "refused":
                standin.start()
            await CASES[case](upstream, standin)
            if case == "refused":
                standin.start()
            started, opened = await streams_reaching_the_upstream_at_once(upstream, standin)
            assert (started, opened) == (LIMIT, LIMIT)
        finally:
            await upstream.aclose()
