"""Every request the upstream serves is paid for (docs/api.md, Proxy "What is charged", "Per-request prices",
"Token prices"): each test closes one way a hostile customer got upstream work for free, and asserts the
balance, the ledger and what the upstream saw."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.conftest import eventually
from tests.proxy.conftest import INTERNAL, Credits, another_proxy, sdk_for
from tests.support.proxy_service import RunningProxy

PRICING = """
default: {per_request: 1, max_output_tokens: 50}
models:
  gpt-4o-mini:
    per_1k_input_tokens: 2
    per_1k_output_tokens: 8
    max_reserve: 40
    upstream_usd: {per_1k_input_tokens: 0.00015, per_1k_output_tokens: 0.0006}
  dall-e-3: {per_request: 5, upstream_usd: {per_request: 0.04}}
  # One credit per token in and out: a charge reads as the tokens the upstream reported.
  # The stand-in bills 255 tokens per image part.
  standin: {per_1k_input_tokens: 1000, per_1k_output_tokens: 1000, max_reserve: 5000, image_input_tokens: 300}
  standin-bill-2000: {per_1k_input_tokens: 1000, per_1k_output_tokens: 1000, max_reserve: 100}
"""
MESSAGES = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(scope="module")
async def revenue(  # type: ignore[no-untyped-def]
    credits_url, standin, redis_url, tmp_path_factory
) -> AsyncIterator[RunningProxy]:
    path = tmp_path_factory.mktemp("revenue") / "pricing.yaml"
    path.write_text(PRICING)
    async with another_proxy(
        credits_url,
        standin.base_url,
        redis_url=redis_url,
        pricing_file=str(path),
        upstream_timeout_seconds=10.0,
    ) as running:
        yield running


def as_user(user: str) -> dict[str, str]:
    return {**INTERNAL, "X-User-Id": user}


def seen_by_upstream(standin: Any, marker: str) -> list[dict[str, Any]]:
    """The bodies the stand-in received whose messages carry `marker`."""
    return [
        r["body"]
        for r in list(standin.app.stats.recent)
        if isinstance(r.get("body"), dict) and marker in str(r["body"].get("messages"))
    ]


# --- 1. charged once forwarded; the upstream call is cancelled when the client leaves ---------------


async def test_a_client_leaving_before_the_answer_is_charged_and_the_upstream_call_cancelled(  # type: ignore[no-untyped-def]
    revenue, credits: Credits, standin
) -> None:
    user = await credits.user(5)
    cancelled = standin.app.stats.cancelled
    async with httpx.AsyncClient(base_url=revenue.url, timeout=httpx.Timeout(30, read=0.3)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/v1/chat/completions",
                json={"model": "standin-slow-3000", "messages": MESSAGES},
                headers=as_user(user),
            )
    # The stand-in saw its caller leave long before its 3 s were up: the proxy cancelled the call.
    await eventually(lambda: standin.app.stats.cancelled > cancelled, timeout=2.5)
    await credits.settled(user, 4, usage_total=1)


async def test_a_stream_left_after_its_first_event_is_charged_and_cancelled_upstream(  # type: ignore[no-untyped-def]
    revenue, credits: Credits, standin
) -> None:
    user = await credits.user(5)
    disconnected = standin.app.stats.streams["disconnected"]
    stream = await sdk_for(revenue, user).chat.completions.create(
        model="standin-trickle-200", messages=MESSAGES, stream=True
    )
    async for chunk in stream:
        assert chunk.choices[0].delta.role == "assistant"  # the role-only first event, no content yet
        break
    await stream.close()
    await eventually(lambda: standin.app.stats.streams["disconnected"] > disconnected, timeout=5)
    await credits.settled(user, 4, usage_total=1)


async def test_a_stream_that_ends_before_any_output_is_not_charged(revenue, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(5)
    stream = await sdk_for(revenue, user).chat.completions.create(
        model="standin-drop-after-1", messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await credits.settled(user, 5, usage_total=0)


# --- 3. token prices count every billed input; the charge follows reported usage --------------------


async def test_a_huge_tool_description_is_refused_before_it_reaches_the_upstream(  # type: ignore[no-untyped-def]
    revenue, gateway, credits: Credits, standin
) -> None:
    user = await credits.user(10)
    marker = "marker-huge-tools"
    tools = [{"type": "function", "function": {"name": "f", "description": "abcd " * 600_000}}]
    async with httpx.AsyncClient(base_url=revenue.url, timeout=30) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": marker}],
                "tools": tools,
                "max_tokens": 1,
            },
            headers=as_user(user),
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert r.headers["x-credits-charged"] == "0"
    assert seen_by_upstream(standin, marker) == []
    await credits.settled(user, 10, usage_total=0)


def _billed_inputs(kind: str, marker: str) -> dict[str, Any]:
    words = " ".join(f"w{i}" for i in range(300))
    user_message = {"role": "user", "content": marker}
    if kind == "tools":
        return {
            "messages": [user_message],
            "tools": [{"type": "function", "function": {"name": "lookup", "description": words}}],
        }
    if kind == "tool_calls":
        call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": words}}
        return {
            "messages": [
                user_message,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
                user_message,
            ]
        }
    if kind == "images":
        part = {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}}
        return {"messages": [{"role": "user", "content": [{"type": "text", "text": marker}, *[part] * 5]}]}
    assert kind == "response_format"
    schema = {"type": "object", "description": words, "properties": {"a": {"type": "string"}}}
    return {
        "messages": [user_message],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }


@pytest.mark.parametrize("kind", ["tools", "tool_calls", "images", "response_format"])
async def test_every_billed_input_is_held_and_charged_as_the_upstream_reports_it(  # type: ignore[no-untyped-def]
    revenue, credits: Credits, standin, kind: str
) -> None:
    user = await credits.user(3000)
    marker = f"marker-{kind}"
    response = await sdk_for(revenue, user).chat.completions.create(
        model="standin", max_tokens=1, **_billed_inputs(kind, marker)
    )
    assert response.usage is not None
    cost = response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.usage.prompt_tokens > 250  # the stand-in billed the input beyond the message text
    assert int(response.choices and 1)
    await credits.settled(user, 3000 - cost, usage_total=cost)


async def test_usage_beyond_the_hold_is_charged_in_full_and_what_the_balance_lacks_is_owed(  # type: ignore[no-untyped-def]
    revenue, credits: Credits
) -> None:
    user = await credits.user(50)
    response = await sdk_for(revenue, user).chat.completions.create(
        model="standin-bill-2000", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert response.usage is not None
    cost = response.usage.prompt_tokens + response.usage.completion_tokens
    assert cost > 2000
    account = await credits.settled(user, 0, usage_total=50)
    assert account["credits_owed"] == cost - 50


# --- 4. per-request prices: n items, and max_output_tokens bounds what a credit buys ------------


async def test_n_choices_and_n_images_multiply_a_per_request_price(revenue, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(20)
    client = sdk_for(revenue, user)
    chat = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, n=3)
    assert len(chat.choices) == 3
    await credits.settled(user, 17, usage_total=3)
    images = await client.images.generate(model="dall-e-3", prompt="a lighthouse", n=2)
    assert images.data is not None and len(images.data) == 2
    await credits.settled(user, 7, usage_total=13)


async def test_n_beyond_the_balance_is_refused_with_402(revenue, credits: Credits, standin) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(10)
    marker = "marker-n-128"
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk_for(revenue, user).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": marker}], n=128, max_tokens=100_000
        )
    assert caught.value.status_code == 402
    assert seen_by_upstream(standin, marker) == []
    await credits.settled(user, 10, usage_total=0)


async def test_max_output_tokens_lowers_or_sets_the_output_limit_sent_upstream(  # type: ignore[no-untyped-def]
    revenue, credits: Credits, standin
) -> None:
    user = await credits.user(10)
    client = sdk_for(revenue, user)
    await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "marker-cap-a"}], max_tokens=100_000
    )
    await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "marker-cap-b"}]
    )
    await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "marker-cap-c"}], max_completion_tokens=7
    )
    (lowered,) = seen_by_upstream(standin, "marker-cap-a")
    assert lowered["max_tokens"] == 50 and "max_completion_tokens" not in lowered
    (set_,) = seen_by_upstream(standin, "marker-cap-b")
    assert set_["max_completion_tokens"] == 50 and "max_tokens" not in set_
    (kept,) = seen_by_upstream(standin, "marker-cap-c")
    assert kept["max_completion_tokens"] == 7
    await credits.settled(user, 7, usage_total=3)


# --- 5. customer input never makes a 500 --------------------------------------------------------

_IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "high"}}
_CALL_OF_3_MB = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "abcd " * 600_000}}
    ],
}
_SCHEMA_OF_1_MB = {
    "type": "json_schema",
    "json_schema": {"name": "s", "schema": {"type": "object", "description": "abcd " * 200_000}},
}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o-mini", "stream": True, "stream_options": "yes"},
        {"model": "gpt-4o-mini", "stream": True, "stream_options": 5},
        {"model": "gpt-4o-mini", "stream": True, "stream_options": [1]},
        {"model": "gpt-4o-mini", "stream": True, "stream_options": True},
        {"model": "gpt-4o-mini", "n": 100_000},
        {"model": "gpt-4o", "n": 100_000},
        {"model": "gpt-4o", "n": 0},
        {"model": "gpt-4o", "n": "3"},
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "word " * 30_000}]},
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [_IMAGE] * 500}], "max_tokens": 1},
        {
            "model": "gpt-4o-mini",
            "messages": [_CALL_OF_3_MB, {"role": "user", "content": "hi"}],
            "max_tokens": 1,
        },
        {"model": "gpt-4o-mini", "response_format": _SCHEMA_OF_1_MB, "max_tokens": 1},
    ],
    ids=[
        "stream_options-str",
        "stream_options-int",
        "stream_options-list",
        "stream_options-bool",
        "n-huge-tokens",
        "n-huge-request",
        "n-zero",
        "n-string",
        "estimate-over-max_reserve",
        "500-high-detail-images",
        "3-MB-tool-call-arguments",
        "1-MB-response_format",
    ],
)
async def test_bad_customer_input_is_a_4xx_in_the_envelope_and_changes_nothing(  # type: ignore[no-untyped-def]
    revenue, credits: Credits, body: dict[str, Any]
) -> None:
    user = await credits.user(10)
    body = {"messages": [{"role": "user", "content": "hi"}], **body}
    async with httpx.AsyncClient(base_url=revenue.url, timeout=30) as http:
        r = await http.post("/v1/chat/completions", json=body, headers=as_user(user))
    assert r.status_code in (400, 402), r.text
    error = r.json()["error"]
    assert error["code"] == ("invalid_request" if r.status_code == 400 else "insufficient_credits")
    assert error["message"]
    await credits.settled(user, 10, usage_total=0)


# --- 2. a hold never lapses while its request is served -----------------------------------------


@pytest.fixture(scope="module")
async def short_ttl(  # type: ignore[no-untyped-def]
    credits_url, standin, redis_url, tmp_path_factory
) -> AsyncIterator[RunningProxy]:
    async with another_proxy(
        credits_url,
        standin.base_url,
        redis_url=redis_url,
        reservation_ttl_seconds=2,
        upstream_timeout_seconds=10.0,
        client_stall_seconds=1.0,
    ) as running:
        yield running


async def test_a_stream_longer_than_the_hold_ttl_is_charged(short_ttl, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(5)
    stream = await sdk_for(short_ttl, user).chat.completions.create(
        model="standin-trickle-100-words-45", messages=MESSAGES, stream=True
    )
    words = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            words += 1
    assert words == 45  # about 4.7 s, more than twice the 2 s TTL
    await credits.settled(user, 4, usage_total=1)


async def test_a_reader_that_stalls_past_the_ttl_is_cut_off_and_charged(  # type: ignore[no-untyped-def]
    short_ttl, credits: Credits, standin
) -> None:
    """The client stops reading (TCP back-pressure stalls the relay) for longer than the hold's TTL,
    then reads on: it is cut off after CLIENT_STALL_SECONDS (1 s here), the upstream call is closed,
    and the request is charged."""
    user = await credits.user(5)
    disconnected = standin.app.stats.streams["disconnected"]
    long_word = "x" * 8000
    # 5000 words of 8 kB, one per millisecond at best: the stand-in is still sending when the reader
    # is cut off (about 1.5 s in), however much the sockets in between buffer. A loopback receive
    # buffer grows up to net.ipv4.tcp_rmem's maximum (6 to 32 MB), so a 12 MB reply could
    # already sit whole in buffers at the cut-off, finished as far as the stand-in is concerned.
    body = orjson.dumps(
        {
            "model": "standin-trickle-1-words-5000",
            "stream": True,
            "messages": [{"role": "user", "content": f"{long_word} {long_word}"}],
        }
    )
    host, port = short_ttl.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the relay stalls soon
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer dev-internal-token\r\nX-User-Id: {user}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    await loop.sock_sendall(sock, head + body)
    received = await loop.sock_recv(sock, 4096)
    assert received.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(3.5)  # reads nothing for longer than the 2 s TTL
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=10):
        received += chunk
    sock.close()
    assert b"data: [DONE]" not in received  # cut off long before the 40 MB reply was relayed
    await eventually(lambda: standin.app.stats.streams["disconnected"] > disconnected, timeout=5)
    await credits.settled(user, 4, usage_total=1)


# --- usage details travel with each commit ------------------------------------------------------


async def test_each_commit_carries_the_usage_details_of_its_ledger_entry(  # type: ignore[no-untyped-def]
    revenue, credits: Credits
) -> None:
    sent: list[dict[str, Any]] = []
    downstream = revenue.app.state.proxy.credits
    original = downstream.settle_batch

    async def spy(items: list[dict[str, Any]]) -> dict[str, Any]:
        sent.extend(items)
        return await original(items)  # type: ignore[no-any-return]

    downstream.settle_batch = spy
    try:
        user = await credits.user(100)
        client = sdk_for(revenue, user)
        chat = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "details please"}], max_tokens=5
        )
        await client.images.generate(model="dall-e-3", prompt="a lighthouse", n=2)
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        await credits.settled(user, 100 - 1 - 10 - 1, usage_total=12)
    finally:
        del downstream.settle_batch
    details = {
        (d["operation"], d["model"]): d
        for item in sent
        if item["action"] == "commit" and (d := item.get("details")) is not None
    }
    assert chat.usage is not None
    assert details[("chat.completions", "gpt-4o-mini")] == {
        "operation": "chat.completions",
        "model": "gpt-4o-mini",
        "input_tokens": chat.usage.prompt_tokens,
        "output_tokens": chat.usage.completion_tokens,
        "upstream_cost_usd": pytest.approx(
            (chat.usage.prompt_tokens * 0.00015 + chat.usage.completion_tokens * 0.0006) / 1000
        ),
    }
    # Images report no tokens; dall-e-3 costs the operator $0.04 an image.
    assert details[("images.generations", "dall-e-3")] == {
        "operation": "images.generations",
        "model": "dall-e-3",
        "input_tokens": None,
        "output_tokens": None,
        "upstream_cost_usd": pytest.approx(0.08),
    }
    # No upstream_usd in its pricing entry: no cost.
    assert details[("chat.completions", "gpt-4o")]["upstream_cost_usd"] is None


async def test_a_body_nested_too_deeply_to_forward_is_refused_and_its_hold_given_back(  # type: ignore[no-untyped-def]
    revenue, credits: Credits, standin
) -> None:
    # The default entry caps the output, so the proxy re-serialises the body it forwards; orjson reads
    # 1024 levels of nesting but writes only 254.
    user = await credits.user(5)
    marker = "marker-too-deep"
    nested = "[" * 300 + "]" * 300
    message = json.dumps({"role": "user", "content": marker})
    raw = '{"model": "unpriced-model", "messages": [' + message + '], "metadata_x": ' + nested + "}"
    async with httpx.AsyncClient(base_url=revenue.url, timeout=30) as http:
        r = await http.post(
            "/v1/chat/completions",
            content=raw,
            headers={**as_user(user), "content-type": "application/json"},
        )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"
    assert seen_by_upstream(standin, marker) == []
    await credits.settled(user, 5, usage_total=0)  # nothing charged, nothing left held
