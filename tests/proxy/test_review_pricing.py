"""A token-priced chat request asking for `n` choices is billed for every choice's output: the hold
covers n times the output cap, so the charge (never more than the hold) is the real cost."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from services.proxy.prices import Price
from services.proxy.pricing import PricingTable
from services.proxy.quote import Quote
from shared.errors import InvalidRequest
from tests.proxy.conftest import Credits

PER_TOKEN = Price(per_1k_input_tokens=Decimal(1000), per_1k_output_tokens=Decimal(1000), max_reserve=100)


def quote(body: dict[str, Any]) -> Quote:
    return PricingTable(default=PER_TOKEN).quote("chat.completions", body, orjson.dumps(body))


def test_quote_holds_the_output_of_every_choice() -> None:
    held = quote({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "n": 4})
    # 5 estimated input tokens ("hi" + 4 of framing) and 4 choices of at most 20 tokens each.
    assert held.largest == 5 + 4 * 20 and held.output_cap is None


def test_quote_caps_each_choice_so_all_of_them_fit_the_hold() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "n": 5}
    held = quote(body)
    assert held.largest == 100
    assert held.output_cap is not None
    assert PER_TOKEN.tokens_cost(held.input_tokens, 5 * held.output_cap) <= held.largest
    # A bool or a nonsense n is refused (400), not guessed at.
    for n in (True, 0, -3, "4", 129):
        with pytest.raises(InvalidRequest):
            quote({**body, "n": n})


async def test_n_choices_are_charged_at_their_real_token_cost(proxy, sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(200)
    client = sdk(user)
    # One credit per token; the stand-in replies 60 words per choice, capped by max_tokens.
    response = await client.chat.completions.create(
        model="standin-trickle-30-words-60",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=20,
        n=4,
    )
    assert len(response.choices) == 4
    assert response.usage is not None
    real_cost = response.usage.prompt_tokens + response.usage.completion_tokens
    assert response.usage.completion_tokens == 80
    await credits.settled(user, 200 - real_cost, usage_total=real_cost)
