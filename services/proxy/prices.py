"""The price of a model, as one entry of `PRICING_FILE` gives it (docs/api.md, Proxy), and that entry's
validation.

A model is priced either per request (a fixed number of credits per item: `n` choices or `n` images) or
per token: input and output tokens each at a rate per 1,000, the sum rounded up to whole credits, with
`max_reserve` bounding the hold taken before the call. An entry may also bound the output a request
may buy (`max_output_tokens`) and say what the provider charges the operator (`upstream_usd`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

ONE_THOUSAND = Decimal(1000)
# Input tokens an image part of a message is held for (`image_input_tokens` overrides it per model).
# OpenAI's high detail bills a 2048x768 image at 1,105 tokens on gpt-4o and about 2,500 on gpt-4.1-mini;
# the charge follows the reported usage whatever this says, so it only sizes the hold.
DEFAULT_IMAGE_INPUT_TOKENS = 2_500


class PricingError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class UpstreamUsd:
    """What the provider charges the operator for one request (for analytics, never for credits)."""

    per_request: Decimal = Decimal(0)
    per_1k_input_tokens: Decimal = Decimal(0)
    per_1k_output_tokens: Decimal = Decimal(0)

    def cost(self, items: int, input_tokens: int, output_tokens: int) -> float:
        exact = (
            self.per_request * items
            + (input_tokens * self.per_1k_input_tokens + output_tokens * self.per_1k_output_tokens)
            / ONE_THOUSAND
        )
        return round(float(exact), 8)


@dataclass(frozen=True, slots=True)
class Price:
    per_request: int | None = None
    per_1k_input_tokens: Decimal = Decimal(0)
    per_1k_output_tokens: Decimal = Decimal(0)
    max_reserve: int = 0
    # The most output tokens one item may generate (sent upstream as its output limit).
    max_output_tokens: int | None = None
    image_input_tokens: int = DEFAULT_IMAGE_INPUT_TOKENS
    upstream_usd: UpstreamUsd | None = None

    @property
    def per_token(self) -> bool:
        return self.per_request is None

    def tokens_cost(self, input_tokens: int, output_tokens: int) -> int:
        """Whole credits for these token counts, rounded up."""
        exact = (
            input_tokens * self.per_1k_input_tokens + output_tokens * self.per_1k_output_tokens
        ) / ONE_THOUSAND
        return math.ceil(exact)

    def output_tokens_within(self, credits: int, input_tokens: int) -> int:
        """The most output tokens `credits` pays for after the input (0 if not even the input is covered)."""
        left = Decimal(credits) * ONE_THOUSAND - input_tokens * self.per_1k_input_tokens
        if left < 0:
            return 0
        if self.per_1k_output_tokens <= 0:
            return 1 << 30
        return int(left // self.per_1k_output_tokens)


DEFAULT_PRICE = Price(per_request=1)

_PRICE_KEYS = {
    "per_request",
    "per_1k_input_tokens",
    "per_1k_output_tokens",
    "max_reserve",
    "max_output_tokens",
    "image_input_tokens",
    "upstream_usd",
}
_TOKEN_KEYS = {"per_1k_input_tokens", "per_1k_output_tokens", "max_reserve", "image_input_tokens"}
_USD_KEYS = {"per_request", "per_1k_input_tokens", "per_1k_output_tokens"}


def _number(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PricingError(f"{where} must be a number")
    try:
        number = Decimal(str(value))
    except Exception:
        raise PricingError(f"{where} must be a number") from None
    if not number.is_finite() or number < 0:
        raise PricingError(f"{where} must be a non-negative number")
    return number


def _whole(value: Any, where: str) -> int:
    number = _number(value, where)
    if number != number.to_integral_value():
        raise PricingError(f"{where} must be a whole number")
    return int(number)


def _mapping(entry: Any, keys: set[str], where: str) -> dict[str, Any]:
    """`entry` when it is a mapping of `keys` only."""
    if not isinstance(entry, dict):
        raise PricingError(f"{where} must be a mapping")
    unknown = set(entry) - keys
    if unknown:
        raise PricingError(f"{where}: unknown keys {sorted(unknown)}")
    return entry


def _upstream_usd(entry: Any, where: str) -> UpstreamUsd:
    entry = _mapping(entry, _USD_KEYS, where)
    return UpstreamUsd(**{key: _number(value, f"{where}.{key}") for key, value in entry.items()})


def parse_price(entry: Any, where: str) -> Price:
    entry = _mapping(entry, _PRICE_KEYS, where)
    common: dict[str, Any] = {}
    if entry.get("max_output_tokens") is not None:
        cap = _whole(entry["max_output_tokens"], f"{where}.max_output_tokens")
        if cap < 1:
            raise PricingError(f"{where}.max_output_tokens must be at least 1")
        common["max_output_tokens"] = cap
    if entry.get("upstream_usd") is not None:
        common["upstream_usd"] = _upstream_usd(entry["upstream_usd"], f"{where}.upstream_usd")
    if "per_request" in entry:
        if set(entry) & _TOKEN_KEYS:
            raise PricingError(f"{where}: per_request cannot be combined with token prices")
        return Price(per_request=_whole(entry["per_request"], f"{where}.per_request"), **common)
    if "per_1k_input_tokens" not in entry and "per_1k_output_tokens" not in entry:
        raise PricingError(f"{where}: needs per_request or per_1k_input_tokens/per_1k_output_tokens")
    if "max_reserve" not in entry:
        raise PricingError(f"{where}: token prices need max_reserve")
    max_reserve = _whole(entry["max_reserve"], f"{where}.max_reserve")
    if max_reserve < 1:
        raise PricingError(f"{where}.max_reserve must be at least 1")
    if "image_input_tokens" in entry:
        common["image_input_tokens"] = _whole(entry["image_input_tokens"], f"{where}.image_input_tokens")
    return Price(
        per_1k_input_tokens=_number(entry.get("per_1k_input_tokens", 0), f"{where}.per_1k_input_tokens"),
        per_1k_output_tokens=_number(entry.get("per_1k_output_tokens", 0), f"{where}.per_1k_output_tokens"),
        max_reserve=max_reserve,
        **common,
    )
