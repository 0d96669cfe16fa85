"""PRICING_FILE parsing and the hold/cap arithmetic (pure; the charged amounts are asserted end to end
in test_charging.py)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.proxy.pricing import (
    DEFAULT_PRICE,
    Price,
    PricingError,
    PricingTable,
    apply_output_cap,
    estimate_input_tokens,
    plan,
)

CONTRACT_EXAMPLE = """
default: {per_request: 1}
models:
  gpt-4o-mini: {per_1k_input_tokens: 2, per_1k_output_tokens: 8, max_reserve: 40}
  dall-e-3: {per_request: 5}
"""


def test_builtin_default_is_one_credit_per_request() -> None:
    table = PricingTable.load(None)
    assert table.price("gpt-4o") == DEFAULT_PRICE == Price(per_request=1)


def test_contract_example(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "pricing.yaml"
    path.write_text(CONTRACT_EXAMPLE)
    table = PricingTable.load(str(path))
    assert table.price("dall-e-3").per_request == 5
    assert table.price("unknown-model").per_request == 1
    mini = table.price("gpt-4o-mini")
    assert mini.per_token and mini.max_reserve == 40
    assert mini.per_1k_input_tokens == Decimal(2) and mini.per_1k_output_tokens == Decimal(8)


@pytest.mark.parametrize(
    "text",
    [
        "default: {per_request: 1.5}",
        "default: {per_request: -1}",
        "models: {m: {per_1k_input_tokens: 1}}",
        "models: {m: {per_request: 1, max_reserve: 3}}",
        "models: {m: {per_1k_input_tokens: 1, max_reserve: 0}}",
        "models: {m: {per_token: 1}}",
        "prices: {}",
    ],
)
def test_bad_files_are_refused(tmp_path, text: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "pricing.yaml"
    path.write_text(text)
    with pytest.raises(PricingError):
        PricingTable.load(str(path))


def test_token_costs_round_up_to_whole_credits() -> None:
    price = Price(per_1k_input_tokens=Decimal(2), per_1k_output_tokens=Decimal(8), max_reserve=40)
    assert price.tokens_cost(0, 0) == 0
    assert price.tokens_cost(1, 0) == 1  # 0.002 credits → 1
    assert price.tokens_cost(500, 0) == 1
    assert price.tokens_cost(501, 0) == 2  # 1.002 → 2
    assert price.tokens_cost(1000, 1000) == 10
    assert price.tokens_cost(1000, 1001) == 11
    fractional = Price(
        per_1k_input_tokens=Decimal("0.15"), per_1k_output_tokens=Decimal("0.6"), max_reserve=5
    )
    assert fractional.tokens_cost(1000, 0) == 1
    assert fractional.tokens_cost(10000, 0) == 2  # exactly 1.5 → 2, with no float error


def test_plan_holds_max_reserve_and_caps_output_to_it() -> None:
    price = Price(per_1k_input_tokens=Decimal(2), per_1k_output_tokens=Decimal(8), max_reserve=40)
    body = {"messages": [{"role": "user", "content": "hello"}]}
    held = plan(price, "chat.completions", body)
    assert held is not None and held.reserve == 40
    tokens = estimate_input_tokens("chat.completions", body)
    assert held.input_tokens == tokens
    # 40 credits = 40,000 milli-credits; input takes 2 per token, output 8 per token.
    assert held.max_output_tokens == (40_000 - 2 * tokens) // 8


def test_plan_with_small_balance_lowers_the_cap_and_refuses_when_input_is_not_covered() -> None:
    price = Price(per_1k_input_tokens=Decimal(2), per_1k_output_tokens=Decimal(8), max_reserve=40)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}
    tokens = estimate_input_tokens("chat.completions", body)
    fitted = plan(price, "chat.completions", body, available=3)
    assert fitted is not None and fitted.reserve == 3
    assert fitted.max_output_tokens == (3_000 - 2 * tokens) // 8
    huge_input = {"messages": [{"role": "user", "content": "word " * 3000}]}
    assert plan(price, "chat.completions", huge_input, available=1) is None


def test_plan_holds_only_what_a_small_max_tokens_needs() -> None:
    price = Price(per_1k_input_tokens=Decimal(2), per_1k_output_tokens=Decimal(8), max_reserve=40)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100}
    held = plan(price, "chat.completions", body)
    assert held is not None
    assert held.reserve == price.tokens_cost(held.input_tokens, 100) == 1
    assert held.max_output_tokens is None


def test_output_cap_goes_into_the_field_the_client_used() -> None:
    legacy = {"max_tokens": 500}
    apply_output_cap(legacy, 20)
    assert legacy == {"max_tokens": 20}
    modern: dict[str, object] = {"max_completion_tokens": 500}
    apply_output_cap(modern, 20)
    assert modern == {"max_completion_tokens": 20}
    neither: dict[str, object] = {}
    apply_output_cap(neither, 20)
    assert neither == {"max_completion_tokens": 20}


def test_per_request_plan_refuses_when_unaffordable() -> None:
    price = Price(per_request=5)
    assert plan(price, "images.generations", {}, available=4) is None
    held = plan(price, "images.generations", {})
    assert held is not None and held.reserve == 5


def test_token_priced_charge_from_usage_or_else_the_hold() -> None:
    from services.proxy.downstream import Reservation
    from services.proxy.metering import Hold

    price = Price(per_1k_input_tokens=Decimal(1000), per_1k_output_tokens=Decimal(1000), max_reserve=40)
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 10}
    chosen = plan(price, "chat.completions", body)
    assert chosen is not None
    hold = Hold("u", "chat.completions", price, chosen, Reservation("r", chosen.reserve, 100))
    # usage present: exactly its tokens (one credit per token here)
    assert hold.cost_from_usage({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}) == 7
    # a stream without usage: the input estimate plus what was relayed
    assert hold.cost_from_usage(None, output_served=2) == chosen.input_tokens + 2
    # a complete answer without usage: its output was never counted, so it costs the hold
    assert hold.cost_from_usage(None) == chosen.reserve
