"""No overspend under concurrency, and token pricing that lowers the output cap instead of overspending."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest

from services.proxy.quote import estimate_input_tokens
from tests.proxy.conftest import Credits, another_proxy, sdk_for


@pytest.mark.both_redis
async def test_200_concurrent_requests_against_25_credits(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(25)
    client = sdk(user, timeout=120)

    async def one() -> int:
        try:
            await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
            return 200
        except openai.APIStatusError as exc:
            assert exc.body["code"] == "insufficient_credits"  # type: ignore[index]
            assert exc.body["message"] == "No credits remaining. Please purchase more credits."  # type: ignore[index]
            return exc.status_code

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    assert statuses.count(200) == 25
    assert statuses.count(402) == 175
    account = await credits.settled(user, 0, usage_total=25)
    assert account["credits_lifetime_used"] >= 25
    rows = await credits.ledger(user)
    assert rows[0]["balance_after"] == 0
    assert sum(await credits.usage(user)) == 25 and len(await credits.usage(user)) == 25


async def test_token_pricing_rounds_up(sdk, credits: Credits, standin) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(50)
    raw = await sdk(user).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}], max_tokens=50
    )
    usage = raw.parse().usage
    assert usage is not None
    exact = (usage.prompt_tokens * 2 + usage.completion_tokens * 8) / 1000
    assert 0 < exact < 1
    assert raw.headers["x-credits-charged"] == "1" == str(math.ceil(exact))
    await credits.settled(user, 49, usage_total=1)


async def test_max_tokens_lowered_to_what_the_balance_covers(sdk, credits: Credits, standin) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(2)
    # The stand-in echoes the prompt's words, so the reply would be ~300 tokens uncapped.
    messages = [{"role": "user", "content": "word " * 300}]
    raw = await sdk(user).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, max_tokens=5000
    )
    sent = [
        r
        for r in standin.app.stats.recent
        if r["model"] == "gpt-4o-mini" and r["body"]["messages"] == messages
    ][-1]["body"]
    input_tokens = estimate_input_tokens("chat.completions", {"messages": messages})
    allowed = (2 * 1000 - 2 * input_tokens) // 8
    assert sent["max_tokens"] == allowed < 5000
    completion = raw.parse()
    assert completion.choices[0].finish_reason == "length"
    assert int(raw.headers["x-credits-charged"]) <= 2
    charged = int(raw.headers["x-credits-charged"])
    await credits.settled(user, 2 - charged, usage_total=charged)


async def test_402_when_not_even_the_input_is_covered(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(1)
    long_prompt = "word " * 1000  # ~1,700 estimated tokens x 2/1k > 1 credit
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk(user).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": long_prompt}]
        )
    assert caught.value.status_code == 402
    assert caught.value.response.headers["x-credits-charged"] == "0"
    assert caught.value.response.headers["x-credits-remaining"] == "1"
    await credits.settled(user, 1, usage_total=0)


async def test_stream_usage_only_when_asked(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(20)
    client = sdk(user)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "a b c"}]
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks), "the usage chunk the proxy asked for must not reach this client"
    # The stream's hold (all 20 credits: less than max_reserve) settles after the stream ends.
    await credits.settled(user, 19, usage_total=1)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "a b c"}],
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and not chunks[-1].choices
    await credits.settled(user, 18, usage_total=2)


async def test_back_to_back_requests_near_the_end_of_the_balance(  # type: ignore[no-untyped-def]
    credits: Credits, credits_url: str, standin, pricing_file: str, redis_url: str
) -> None:
    """Settlements linger to share a batch, so right after a response its hold still covers the
    whole price (40 here, 1 charged). The next request of the same user must not be refused, nor
    have its output cut, for credits that are about to come back: it waits for the settlement."""
    user = await credits.user(40)
    async with another_proxy(
        credits_url,
        standin.base_url,
        redis_url=redis_url,
        pricing_file=pricing_file,
        settle_linger_ms=500,  # wide enough that the second request surely comes within it
    ) as lingering:
        client = sdk_for(lingering, user)
        first = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert first.headers["x-credits-charged"] == "1"
        second = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1000
        )
        assert second.headers["x-credits-charged"] == "1"
        assert second.parse().usage.completion_tokens > 0  # type: ignore[union-attr]
        await client.close()
    await credits.settled(user, 38, usage_total=2)
