"""Upstream failures map as docs/api.md (Proxy) says and are not charged; a stream cut short is charged for
what was served; every hold ends (credits_reserved back to 0)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest

from services.proxy.quote import estimate_input_tokens
from tests.openai_schema import CHAT_COMPLETION_CHUNK, validate
from tests.proxy.conftest import Credits, another_proxy, sdk_for

MESSAGES = [{"role": "user", "content": "tell me a story"}]


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("standin-fail-500", 502, "upstream_error"),
        ("standin-fail-503", 502, "upstream_error"),
        ("standin-timeout", 504, "upstream_timeout"),
    ],
)
async def test_upstream_failures_are_not_charged(
    sdk, credits: Credits, model: str, status: int, code: str
) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(7)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(user).chat.completions.create(model=model, messages=MESSAGES)
    error = caught.value
    assert error.status_code == status
    assert error.body["code"] == code  # type: ignore[index]
    assert error.response.headers["x-credits-charged"] == "0"
    assert error.response.headers["x-credits-remaining"] == "7"
    await credits.settled(user, 7, usage_total=0)


async def test_upstream_4xx_keeps_status_and_message(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(7)
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(user).chat.completions.create(model="standin-fail-400", messages=MESSAGES)
    assert caught.value.status_code == 400
    assert caught.value.body["message"] == "The stand-in was asked to reject this request."  # type: ignore[index]
    with pytest.raises(openai.RateLimitError):
        await sdk(user).chat.completions.create(model="standin-fail-429", messages=MESSAGES)
    await credits.settled(user, 7, usage_total=0)


async def test_unreachable_upstream_is_502_and_not_charged(credits: Credits, credits_url: str, sdk) -> None:  # type: ignore[no-untyped-def]
    from tests.support.servers import free_port

    user = await credits.user(5)
    async with another_proxy(credits_url, f"http://127.0.0.1:{free_port()}/v1") as dead:
        client = sdk_for(dead, user)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert caught.value.status_code == 502
        await client.close()
    await credits.settled(user, 5, usage_total=0)


async def test_upstream_failure_before_stream_starts(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(3)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(user).chat.completions.create(model="standin-fail-500", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 502
    await credits.settled(user, 3, usage_total=0)


async def _stream_lines(proxy, user: str, body: dict, stop_after: int | None = None) -> list[str]:  # type: ignore[no-untyped-def,type-arg]
    lines: list[str] = []
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream(
            "POST",
            f"{proxy.base_url}/chat/completions",
            json=body,
            headers={"Authorization": "Bearer dev-internal-token", "X-User-Id": user},
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line:
                    lines.append(line)
                if stop_after is not None and sum('"content":"' in x for x in lines) > stop_after:
                    break
    return lines


async def test_midstream_drop_is_charged_only_for_what_was_served(proxy, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(100)
    body = {"model": "standin-drop-after-5", "stream": True, "messages": MESSAGES}
    lines = await _stream_lines(proxy, user, body)
    assert "data: [DONE]" not in lines
    error = orjson.loads(lines[-1][6:])
    assert error["error"]["code"] == "upstream_error"
    chunks = [orjson.loads(x[6:]) for x in lines[:-1]]
    for chunk in chunks:
        validate(CHAT_COMPLETION_CHUNK, chunk)
    served_tokens = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
    assert served_tokens == 4  # the role event, then four words, then the cut
    expected = estimate_input_tokens("chat.completions", body) + served_tokens  # 1 credit per token
    await credits.settled(user, 100 - expected, usage_total=expected)


async def test_drop_before_any_content_is_not_charged(proxy, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(5)
    lines = await _stream_lines(
        proxy, user, {"model": "standin-drop-after-1", "stream": True, "messages": MESSAGES}
    )
    assert "upstream_error" in lines[-1]
    await credits.settled(user, 5, usage_total=0)
    # Per-request pricing: once content went out, the request was served and pays its price.
    lines = await _stream_lines(
        proxy, user, {"model": "standin-drop-after-3", "stream": True, "messages": MESSAGES}
    )
    await credits.settled(user, 4, usage_total=1)


async def test_client_leaving_midstream_pays_for_what_was_forwarded(proxy, credits: Credits, standin) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(100)
    body = {"model": "standin-trickle-30-words-60", "stream": True, "messages": MESSAGES}
    lines = await _stream_lines(proxy, user, body, stop_after=3)
    assert len(lines) < 20
    input_cost = estimate_input_tokens("chat.completions", body)
    account = await credits.settled(user, remaining=await _eventual_remaining(credits, user))
    charged = 100 - account["credits_remaining"]
    # At least what this client read, far less than the 60-word reply it left.
    assert input_cost + 3 <= charged < input_cost + 20
    assert await credits.usage(user) == [charged]


async def _eventual_remaining(credits: Credits, user: str) -> int:
    for _ in range(200):
        account = await credits.account(user)
        if account["credits_reserved"] == 0:
            return int(account["credits_remaining"])
        await asyncio.sleep(0.05)
    raise AssertionError(f"hold never ended: {account}")


async def test_client_gone_before_the_answer_is_charged(proxy, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    """The client hangs up while upstream is still working: the request was forwarded, so it is
    charged (docs/api.md, Proxy "What is charged"); the proxy cancels the upstream call."""
    from tests.conftest import eventually

    user = await credits.user(7)
    before = await credits.ledger(user)
    body = {"model": "standin-slow-400", "messages": MESSAGES}
    headers = {"Authorization": "Bearer dev-internal-token", "X-User-Id": user}
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        request = asyncio.ensure_future(http.post("/v1/chat/completions", json=body, headers=headers))

        async def held() -> bool:
            return (await credits.account(user))["credits_reserved"] == 1

        await eventually(held, timeout=5, interval=0.01)
        request.cancel()  # closes the connection mid-request
        with pytest.raises(asyncio.CancelledError):
            await request
    await credits.settled(user, 6, usage_total=1)
    assert len(await credits.ledger(user)) == len(before) + 1  # one usage entry for the abandoned request
