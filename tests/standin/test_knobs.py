"""Failure and latency knobs, selected per request by header or by model name."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, AsyncStream
from openai.types.chat import ChatCompletionChunk

from services.standin import StandinConfig, StandinServer, run_in_thread
from services.standin.knobs import KnobError, parse_model
from tests.openai_schema import validate, validate_sse_event

USER = [{"role": "user", "content": "one two three four five six"}]

# Each case once by header, once by model name, since a gateway may forward only the latter.
FAILURES = [
    ("500", "standin-fail-500", openai.InternalServerError),
    ("503", "standin-fail-503", openai.InternalServerError),
    ("400", "standin-fail-400", openai.BadRequestError),
    ("404", "standin-fail-404", openai.NotFoundError),
    ("429", "standin-fail-429", openai.RateLimitError),
]


def knob_kwargs(via: str, headers: dict[str, str], model: str) -> dict[str, object]:
    """The request's knobs by header (on an ordinary model) or by model name."""
    return {"model": "gpt-4o-mini", "extra_headers": headers} if via == "header" else {"model": model}


async def chunks_before(
    error: type[Exception], stream: AsyncStream[ChatCompletionChunk]
) -> list[ChatCompletionChunk]:
    """The chunks `stream` delivers before it fails with `error`, which it must."""
    received: list[ChatCompletionChunk] = []
    with pytest.raises(error):
        async with stream:
            async for chunk in stream:
                received.append(chunk)
    return received


@pytest.mark.parametrize(("status", "model", "error"), FAILURES)
@pytest.mark.parametrize("via", ["header", "model"])
async def test_injected_http_failures(
    client: AsyncOpenAI, status: str, model: str, error: type[openai.APIStatusError], via: str
) -> None:
    kwargs = knob_kwargs(via, {"X-Standin-Fail": status}, model)
    with pytest.raises(error) as caught:
        await client.chat.completions.create(messages=USER, **kwargs)
    assert caught.value.status_code == int(status)
    validate("ErrorResponse", caught.value.response.json())


async def test_injected_failure_on_every_endpoint(client: AsyncOpenAI) -> None:
    fail = {"X-Standin-Fail": "500"}
    with pytest.raises(openai.InternalServerError):
        await client.models.list(extra_headers=fail)
    with pytest.raises(openai.InternalServerError):
        await client.embeddings.create(model="standin-fail-500", input="x")
    with pytest.raises(openai.BadRequestError):
        await client.images.generate(model="standin-fail-400", prompt="x")
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="standin-fail-500", messages=USER, stream=True)


@pytest.mark.parametrize("via", ["header", "model"])
async def test_timeout(client: AsyncOpenAI, via: str) -> None:
    kwargs = knob_kwargs(via, {"X-Standin-Fail": "timeout"}, "standin-timeout")
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await client.with_options(timeout=0.3).chat.completions.create(messages=USER, **kwargs)
    assert time.monotonic() - started < 5


async def test_timeout_ends_when_its_hang_time_runs_out() -> None:
    with run_in_thread(StandinConfig(hang_seconds=0.05)) as server:
        async with AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as caught:
                await c.chat.completions.create(model="standin-timeout", messages=USER)
    assert caught.value.status_code == 504


@pytest.mark.parametrize("via", ["header", "model"])
async def test_drop_cuts_the_stream_before_done(client: AsyncOpenAI, via: str) -> None:
    kwargs = knob_kwargs(via, {"X-Standin-Fail": "drop", "X-Standin-Drop-After": "3"}, "standin-drop-after-3")
    stream = await client.chat.completions.create(messages=USER, stream=True, **kwargs)
    received = await chunks_before(openai.APIConnectionError, stream)
    assert len(received) == 3


async def test_drop_at_raw_level_has_no_done_and_no_chunked_terminator(standin: StandinServer) -> None:
    body = {"model": "standin-drop-after-2", "messages": USER, "stream": True}
    lines: list[str] = []
    async with httpx.AsyncClient(base_url=standin.base_url, headers={"Authorization": "Bearer x"}) as plain:
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            async with plain.stream("POST", "/chat/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line:
                        lines.append(line)
    assert len(lines) == 2
    assert "data: [DONE]" not in lines
    for line in lines:
        validate_sse_event(line.removeprefix("data: "))


async def test_drop_after_more_events_than_the_stream_has_still_skips_done(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="standin-drop-after-500",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    )
    received = await chunks_before(openai.APIConnectionError, stream)
    # Every event including the usage chunk arrived; only the end of the stream is missing.
    assert received[-1].usage is not None


async def test_drop_without_stream_truncates_the_body(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="standin-drop", messages=USER)
    with pytest.raises(openai.APIConnectionError):
        await client.embeddings.create(
            model="text-embedding-3-small", input="x", extra_headers={"X-Standin-Fail": "drop"}
        )


async def test_stall_goes_silent_mid_stream(client: AsyncOpenAI) -> None:
    stream = await client.with_options(timeout=0.3).chat.completions.create(
        model="standin-stall-after-2",
        messages=USER,
        stream=True,
    )
    received = await chunks_before(openai.APITimeoutError, stream)
    assert len(received) == 2


@pytest.mark.parametrize("via", ["header", "model"])
async def test_latency(client: AsyncOpenAI, via: str) -> None:
    kwargs = knob_kwargs(via, {"X-Standin-Latency-Ms": "150"}, "standin-slow-150")
    started = time.monotonic()
    await client.chat.completions.create(messages=USER, **kwargs)
    assert time.monotonic() - started >= 0.15


async def test_chunk_delay_spaces_stream_events(client: AsyncOpenAI) -> None:
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="standin-trickle-20-words-5",
        messages=USER,
        stream=True,
    )
    async with stream:
        chunks = [chunk async for chunk in stream]
    # role + 5 words + finish = 7 events, 6 gaps between them.
    assert len(chunks) == 7
    assert time.monotonic() - started >= 6 * 0.02


async def test_reply_words(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER,
        extra_headers={"X-Standin-Reply-Words": "40"},
    )
    content = completion.choices[0].message.content
    assert content is not None
    assert len(content.split()) == 40
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 40


async def test_header_wins_over_model_name(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="standin-fail-500",
            messages=USER,
            extra_headers={"X-Standin-Fail": "429"},
        )


async def test_plain_standin_model_and_combined_knobs(client: AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="standin", messages=USER)
    assert completion.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(
        model="standin-slow-10-words-20-drop-after-5",
        messages=USER,
        stream=True,
    )
    received = await chunks_before(openai.APIConnectionError, stream)
    assert len(received) == 5


@pytest.mark.parametrize(
    ("model", "headers"),
    [
        ("standin-fial-500", {}),
        ("standin-fail-200", {}),
        ("standin-drop-after-x", {}),
        ("gpt-4o-mini", {"X-Standin-Fail": "explode"}),
        ("gpt-4o-mini", {"X-Standin-Latency": "5"}),
    ],
)
async def test_unknown_knobs_are_rejected(
    http: httpx.AsyncClient, model: str, headers: dict[str, str]
) -> None:
    response = await http.post("/chat/completions", json={"model": model, "messages": USER}, headers=headers)
    assert response.status_code == 400
    validate("ErrorResponse", response.json())


def test_model_names_without_prefix_have_no_knobs() -> None:
    assert parse_model("gpt-4o-mini") == parse_model("standin")
    assert parse_model("standin-drop-after-3").drop_after == 3
    with pytest.raises(KnobError):
        parse_model("standin-slow")


async def test_concurrent_requests_keep_their_own_knobs(client: AsyncOpenAI) -> None:
    async def ok() -> str | None:
        completion = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        return completion.choices[0].finish_reason

    async def slow_stream() -> int:
        stream = await client.chat.completions.create(
            model="standin-trickle-10",
            messages=USER,
            stream=True,
        )
        async with stream:
            return len([chunk async for chunk in stream])

    async def failing() -> BaseException | None:
        try:
            await client.chat.completions.create(model="standin-fail-500", messages=USER)
        except openai.InternalServerError as exc:
            return exc
        return None

    async def dropping() -> BaseException | None:
        stream = await client.chat.completions.create(
            model="standin-trickle-5-drop-after-2",
            messages=USER,
            stream=True,
        )
        try:
            async with stream:
                async for _ in stream:
                    pass
        except openai.APIConnectionError as exc:
            return exc
        return None

    results = await asyncio.gather(
        *(ok() for _ in range(5)), slow_stream(), failing(), dropping(), slow_stream()
    )
    assert results[:5] == ["stop"] * 5
    assert results[5] == results[8] == 10  # role + 2 prefix words + 6 words + finish
    assert isinstance(results[6], openai.InternalServerError)
    assert isinstance(results[7], openai.APIConnectionError)


async def test_server_stops_promptly_with_a_request_held() -> None:
    server = run_in_thread()
    async with AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
        held = asyncio.ensure_future(c.chat.completions.create(model="standin-timeout", messages=USER))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await asyncio.to_thread(server.stop)
        assert time.monotonic() - started < 5
        with pytest.raises(openai.APIError):
            await held


@pytest.mark.parametrize("via", ["header", "model"])
async def test_bill_adds_prompt_tokens_and_tools_are_billed_input(client: AsyncOpenAI, via: str) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "description": "alpha beta gamma"}}]
    plain = await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    with_tools = await client.chat.completions.create(model="gpt-4o-mini", messages=USER, tools=tools)  # type: ignore[arg-type]
    assert plain.usage is not None and with_tools.usage is not None
    assert plain.usage.prompt_tokens == 6
    assert with_tools.usage.prompt_tokens > 6 + 3  # the description's words and the schema's
    if via == "header":
        billed = await client.chat.completions.create(
            model="gpt-4o-mini", messages=USER, extra_headers={"X-Standin-Bill-Tokens": "500"}
        )
    else:
        billed = await client.chat.completions.create(model="standin-bill-500", messages=USER)
    assert billed.usage is not None and billed.usage.prompt_tokens == 6 + 500


async def test_latency_watches_for_the_client_leaving(standin: StandinServer) -> None:
    cancelled = standin.app.stats.cancelled
    async with httpx.AsyncClient(base_url=standin.url, timeout=httpx.Timeout(10, read=0.2)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/v1/chat/completions",
                json={"model": "standin-slow-3000", "messages": USER},
                headers={"Authorization": "Bearer x"},
            )
    for _ in range(100):
        if standin.app.stats.cancelled > cancelled:
            break
        await asyncio.sleep(0.02)
    assert standin.app.stats.cancelled == cancelled + 1
    assert parse_model("standin-bill-7").bill_tokens == 7
