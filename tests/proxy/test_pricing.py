"""PRICING_FILE parsing and the hold/cap arithmetic (pure; the charged amounts are asserted end to end
in test_charging.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from services.proxy.prices import DEFAULT_PRICE, Price, PricingError
from services.proxy.pricing import PricingTable
from services.proxy.quote import Quote, apply_output_cap, estimate_input_tokens

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
        "models: {m: {per_request: 1, max_output_tokens: 0}}",
        "models: {m: {per_request: 1, upstream_usd: {per_token: 1}}}",
        "models: {m: {per_request: 1, upstream_usd: 3}}",
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


def quote(price: Price, operation: str, body: dict[str, Any]) -> Quote:
    return PricingTable(default=price).quote(operation, body, orjson.dumps(body))


def test_quote_holds_max_reserve_and_caps_output_to_it() -> None:
    price = Price(per_1k_input_tokens=Decimal(2), per_1k_output_tokens=Decimal(8), max_reserve=40)
    body = {"messages": [{"role": "user", "content": "hello"}]}
    held = quote(price, "chat.completions", body)
    assert held.largest == 40
    tokens = estimate_input_tokens("chat.completions", body)
    assert held.input_tokens == tokens
    # 40 credits = 40,000 milli-credits; input takes 2 per token, output 8 per token.
    assert held.output_cap == (40_000 - 2 * tokens) // 8


def test_quote_fitted_to_a_small_balance_lowers_the_cap_and_refuses_when_input_is_not_covered() -> None:
    price = Price(per_1k_input_tokens=Decimal(2), per_1k_output_tokens=Decimal(8), max_reserve=40)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}
    tokens = estimate_input_tokens("chat.completions", body)
    fitted = quote(price, "chat.completions", body).fitted(3)
    assert fitted is not None and fitted.largest == 3
    assert fitted.output_cap == (3_000 - 2 * tokens) // 8
    huge_input = {"messages": [{"role": "user", "content": "word " * 3000}]}
    assert quote(price, "chat.completions", huge_input).fitted(1) is None


def test_quote_holds_only_what_a_small_max_tokens_needs() -> None:
    price = Price(per_1k_input_tokens=Decimal(2), per_1k_output_tokens=Decimal(8), max_reserve=40)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100}
    held = quote(price, "chat.completions", body)
    assert held.largest == price.tokens_cost(held.input_tokens, 100) == 1
    assert held.output_cap is None
    raw = orjson.dumps(body)
    assert held.forward() is held.raw == raw  # nothing to change: the client's bytes go upstream


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


def test_per_request_quote_is_refused_when_unaffordable_and_multiplied_by_n() -> None:
    price = Price(per_request=5)
    assert quote(price, "images.generations", {}).fitted(4) is None
    assert quote(price, "images.generations", {}).largest == 5
    assert quote(price, "images.generations", {"n": 3}).largest == 15
    assert quote(price, "chat.completions", {"n": 4}).largest == 20


def test_token_priced_charge_follows_usage_beyond_the_hold_or_else_the_estimate() -> None:
    price = Price(per_1k_input_tokens=Decimal(1000), per_1k_output_tokens=Decimal(1000), max_reserve=40)
    body = {"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 10}
    chosen = quote(price, "chat.completions", body)
    # usage present: exactly its tokens (one credit per token here), even beyond the hold
    assert chosen.charge({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}).credits == 7
    assert chosen.charge({"prompt_tokens": 300, "completion_tokens": 4}).credits == 304 > chosen.largest
    # a stream without usage: the input estimate plus what was relayed
    assert chosen.charge(None, output_served=2).credits == chosen.input_tokens + 2
    # a complete answer without usage: its output was never counted, so it costs the hold
    assert chosen.charge(None).credits == chosen.largest


def test_every_billed_chat_input_counts_and_a_deep_schema_cannot_crash_the_estimate() -> None:
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    base = estimate_input_tokens("chat.completions", plain)
    words = "alpha " * 3000
    for extra in (
        {"tools": [{"type": "function", "function": {"name": "f", "description": words}}]},
        {"functions": [{"name": "f", "description": words}]},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"description": words}}}},
    ):
        assert estimate_input_tokens("chat.completions", {**plain, **extra}) >= base + 3000
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": words}}
    with_call = {"messages": [*plain["messages"], {"role": "assistant", "tool_calls": [call]}]}
    assert estimate_input_tokens("chat.completions", with_call) >= base + 3000
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    with_images = {"messages": [{"role": "user", "content": [image] * 3}]}
    # An image counts as an image, not as the bytes of its data URL.
    assert estimate_input_tokens("chat.completions", with_images, image_tokens=1000) == 4 + 3000
    deep: Any = "leaf"
    for _ in range(5000):
        deep = {"a": deep}
    assert estimate_input_tokens("chat.completions", {**plain, "response_format": deep}) > base


def test_pricing_entries_with_output_caps_and_upstream_costs() -> None:
    table = PricingTable.from_mapping(
        {
            "default": {"per_request": 1, "max_output_tokens": 64},
            "models": {
                "m": {
                    "per_1k_input_tokens": 2,
                    "per_1k_output_tokens": 8,
                    "max_reserve": 40,
                    "upstream_usd": {"per_1k_input_tokens": 0.15, "per_1k_output_tokens": 0.6},
                },
                "img": {"per_request": 5, "upstream_usd": {"per_request": 0.04}},
            },
        }
    )
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    q = table.quote("chat.completions", body, orjson.dumps(body))
    assert q.output_cap == 64 and orjson.loads(q.forward())["max_tokens"] == 64
    assert q.details(q.charge(None)) == {
        "operation": "chat.completions",
        "model": "x",
        "input_tokens": None,
        "output_tokens": None,
        "upstream_cost_usd": None,
    }
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    q = table.quote("chat.completions", body, orjson.dumps(body))
    charge = q.charge({"prompt_tokens": 1000, "completion_tokens": 2000})
    assert charge.credits == 2 + 16
    assert q.details(charge)["upstream_cost_usd"] == pytest.approx(0.15 + 1.2)
    body = {"model": "img", "prompt": "p", "n": 2}
    q = table.quote("images.generations", body, orjson.dumps(body))
    assert q.largest == 10 and q.charge(None).upstream_cost_usd == pytest.approx(0.08)


def test_the_example_pricing_file_loads_and_no_credit_buys_more_than_its_upstream_bound() -> None:
    """deploy/pricing.example.yaml: every model whose provider price is given keeps one credit's
    upstream cost within seed 000's "$0.039 of AI cost per credit"."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "deploy" / "pricing.example.yaml"
    table = PricingTable.load(str(path))
    assert table.models is not None
    for name in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o3", "o4-mini"):
        assert table.price(name).per_token, name
    assert table.price("dall-e-3").per_request == 12
    assert table.default.max_output_tokens == 1024
    bound = Decimal("0.039")
    for name, price in table.models.items():
        usd = price.upstream_usd
        assert usd is not None, name
        if price.per_request is not None:
            assert usd.per_request <= bound * price.per_request, name
            continue
        for credits, dollars in (
            (price.per_1k_input_tokens, usd.per_1k_input_tokens),
            (price.per_1k_output_tokens, usd.per_1k_output_tokens),
        ):
            assert dollars <= bound * credits, name
