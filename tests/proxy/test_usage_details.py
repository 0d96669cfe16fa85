"""The usage `details` a commit carries come from the customer's request (the model name): whatever
that text is, credits must accept the settlement, and the other settlements batched with it."""

from __future__ import annotations

import asyncio

import httpx

from tests.proxy.conftest import INTERNAL, Credits
from tests.support.proxy_service import RunningProxy


async def test_a_hostile_model_name_neither_goes_unpaid_nor_bounces_the_batch_it_travels_in(
    proxy: RunningProxy, credits: Credits
) -> None:
    hostile = "x" * 300 + "\u0007\u200b\x7f"
    users = [await credits.user(3) for _ in range(6)]
    models = [hostile if i % 2 == 0 else "gpt-4o-mini" for i in range(len(users))]
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        # Sent together, so their settlements share the proxy's batches.
        answers = await asyncio.gather(
            *(
                http.post(
                    "/v1/chat/completions",
                    json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                    headers={**INTERNAL, "X-User-Id": user},
                )
                for user, model in zip(users, models, strict=True)
            )
        )
    assert [a.status_code for a in answers] == [200] * len(users), [a.text for a in answers]
    for user, model in zip(users, models, strict=True):
        await credits.settled(user, 2, usage_total=1)
        entry = next(e for e in await credits.ledger(user) if e["type"] == "usage")  # newest first
        label = entry["details"]["model"]
        if model == hostile:
            # Kept as far as credits can store it: printable, bounded.
            assert label == "x" * 200
        else:
            assert label == model
        assert entry["details"]["operation"] == "chat.completions"


async def test_usage_beyond_what_credits_stores_is_kept_at_its_bound_and_the_request_paid(
    proxy: RunningProxy, credits: Credits
) -> None:
    """An upstream that reports absurd usage (here 5e12 prompt tokens on a per-request price) must not
    make credits refuse the settlement: the request is charged, the figure kept at credits' bound."""
    user = await credits.user(3)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "standin-bill-5000000000000", "messages": [{"role": "user", "content": "hi"}]},
            headers={**INTERNAL, "X-User-Id": user},
        )
    assert r.status_code == 200, r.text
    await credits.settled(user, 2, usage_total=1)
    entry = next(e for e in await credits.ledger(user) if e["type"] == "usage")
    assert entry["details"]["input_tokens"] == 10**12
