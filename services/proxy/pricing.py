"""What a request costs (CONTRACT §6.2 `PRICING_FILE`), and how much of it to hold before calling upstream.

A model is priced either per request (a fixed number of credits) or per token: input and output
tokens each at a rate per 1,000, the sum rounded up to whole credits, with `max_reserve` bounding
the hold taken before the call. A token-priced request never spends more than it held: the output
it may generate (`max_tokens` / `max_completion_tokens`) is lowered to what the hold covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

ONE_THOUSAND = Decimal(1000)


class PricingError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Price:
    per_request: int | None = None
    per_1k_input_tokens: Decimal = Decimal(0)
    per_1k_output_tokens: Decimal = Decimal(0)
    max_reserve: int = 0

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
        raise PricingError(f"{where} must be a whole number of credits")
    return int(number)


def parse_price(entry: Any, where: str) -> Price:
    if not isinstance(entry, dict):
        raise PricingError(f"{where} must be a mapping")
    unknown = set(entry) - {"per_request", "per_1k_input_tokens", "per_1k_output_tokens", "max_reserve"}
    if unknown:
        raise PricingError(f"{where}: unknown keys {sorted(unknown)}")
    if "per_request" in entry:
        if len(entry) != 1:
            raise PricingError(f"{where}: per_request cannot be combined with token prices")
        return Price(per_request=_whole(entry["per_request"], f"{where}.per_request"))
    if "per_1k_input_tokens" not in entry and "per_1k_output_tokens" not in entry:
        raise PricingError(f"{where}: needs per_request or per_1k_input_tokens/per_1k_output_tokens")
    if "max_reserve" not in entry:
        raise PricingError(f"{where}: token prices need max_reserve")
    max_reserve = _whole(entry["max_reserve"], f"{where}.max_reserve")
    if max_reserve < 1:
        raise PricingError(f"{where}.max_reserve must be at least 1")
    return Price(
        per_1k_input_tokens=_number(entry.get("per_1k_input_tokens", 0), f"{where}.per_1k_input_tokens"),
        per_1k_output_tokens=_number(entry.get("per_1k_output_tokens", 0), f"{where}.per_1k_output_tokens"),
        max_reserve=max_reserve,
    )


@dataclass(frozen=True)
class PricingTable:
    default: Price = DEFAULT_PRICE
    models: dict[str, Price] | None = None

    def price(self, model: str | None) -> Price:
        if model and self.models:
            found = self.models.get(model)
            if found is not None:
                return found
        return self.default

    @classmethod
    def from_mapping(cls, data: Any) -> PricingTable:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PricingError("the pricing file must be a mapping with `default` and/or `models`")
        unknown = set(data) - {"default", "models"}
        if unknown:
            raise PricingError(f"unknown top-level keys {sorted(unknown)}")
        default = (
            parse_price(data["default"], "default") if data.get("default") is not None else DEFAULT_PRICE
        )
        models_raw = data.get("models") or {}
        if not isinstance(models_raw, dict):
            raise PricingError("`models` must map model names to prices")
        models = {str(name): parse_price(entry, f"models.{name}") for name, entry in models_raw.items()}
        return cls(default=default, models=models)

    @classmethod
    def load(cls, path: str | None) -> PricingTable:
        if not path:
            return cls()
        text = Path(path).read_text(encoding="utf-8")
        return cls.from_mapping(yaml.safe_load(text))


# --- estimating a request's tokens before the call ------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate_tokens(text: str) -> int:
    """A deliberately high estimate of a text's tokens (no tokenizer on the hot path).

    English runs near 4 characters per token; counting one token per 3 characters, and never fewer
    than the number of words, keeps the estimate above the real count so the hold covers the input.
    """
    if not text:
        return 0
    return max(len(text.split()), math.ceil(len(text) / 3))


def estimate_input_tokens(operation: str, body: dict[str, Any]) -> int:
    if operation == "chat.completions":
        messages = body.get("messages")
        if not isinstance(messages, list):
            return 0
        # A few tokens of framing per message, as OpenAI counts them.
        return sum(estimate_tokens(_text_of(m.get("content"))) + 4 for m in messages if isinstance(m, dict))
    if operation == "embeddings":
        value = body.get("input")
        if isinstance(value, str):
            return estimate_tokens(value)
        if isinstance(value, list):
            total = 0
            for item in value:
                if isinstance(item, str):
                    total += estimate_tokens(item)
                elif isinstance(item, list):
                    total += len(item)
                elif isinstance(item, int):
                    total += 1
            return total
        return 0
    if operation == "images.generations":
        prompt = body.get("prompt")
        return estimate_tokens(prompt) if isinstance(prompt, str) else 0
    return 0


def usage_tokens(usage: Any) -> tuple[int, int] | None:
    """(input, output) tokens from an OpenAI `usage` object (chat, embeddings or images)."""
    if not isinstance(usage, dict):
        return None
    input_tokens = usage.get("prompt_tokens", usage.get("input_tokens"))
    output_tokens = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(input_tokens, int) or not isinstance(output_tokens, int):
        return None
    return input_tokens, output_tokens


@dataclass(frozen=True, slots=True)
class Plan:
    """What to hold for a request, and the output cap that keeps its cost within the hold."""

    reserve: int
    # The estimated input tokens the hold was sized for.
    input_tokens: int = 0
    # For token-priced chat: the output cap to send upstream (None: leave the request alone).
    max_output_tokens: int | None = None


def requested_output_cap(body: dict[str, Any]) -> int | None:
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def requested_choices(body: dict[str, Any]) -> int:
    """How many completions a chat request asks for (`n`): each one is billed its own output tokens."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def plan(price: Price, operation: str, body: dict[str, Any], available: int | None = None) -> Plan | None:
    """The hold for this request, given (if known) the credits available; None when even the input is
    not covered. Per-request prices hold the price; token prices hold what the requested output needs,
    at most `max_reserve` and at most what is available, and cap the output to what the hold covers.
    The output cap applies to each of the `n` choices, so the hold covers `n` times it."""
    if price.per_request is not None:
        if available is not None and available < price.per_request:
            return None
        return Plan(reserve=price.per_request)
    input_tokens = estimate_input_tokens(operation, body)
    budget = price.max_reserve if available is None else min(price.max_reserve, available)
    if operation != "chat.completions":
        # Embeddings and images have no output to trim: hold the estimate of the input.
        needed = max(1, price.tokens_cost(input_tokens, 0))
        if available is not None and needed > available:
            return None
        return Plan(reserve=needed, input_tokens=input_tokens)
    cap = requested_output_cap(body)
    choices = requested_choices(body)
    if cap is not None:
        wanted = max(1, price.tokens_cost(input_tokens, cap * choices))
        if wanted <= budget:
            return Plan(reserve=wanted, input_tokens=input_tokens, max_output_tokens=None)
    allowed = price.output_tokens_within(budget, input_tokens) // choices
    if allowed < 1 or budget < 1:
        return None
    if cap is not None:
        allowed = min(allowed, cap)
    return Plan(reserve=budget, input_tokens=input_tokens, max_output_tokens=allowed)


def apply_output_cap(body: dict[str, Any], cap: int) -> None:
    """Lowers the request's output limit to `cap`, in the field the client used (the current one otherwise)."""
    if isinstance(body.get("max_tokens"), int) and "max_completion_tokens" not in body:
        body["max_tokens"] = cap
    else:
        body.pop("max_tokens", None)
        body["max_completion_tokens"] = cap
