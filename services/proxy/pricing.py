"""What a request costs (docs/api.md, Proxy `PRICING_FILE`), decided once per request into a `Quote`.

A model is priced either per request (a fixed number of credits per item: `n` choices or `n` images) or
per token: input and output tokens each at a rate per 1,000, the sum rounded up to whole credits, with
`max_reserve` bounding the hold taken before the call. An entry may also bound the output a request
may buy (`max_output_tokens`) and say what the provider charges the operator (`upstream_usd`).

`PricingTable.quote` turns one request into a `Quote`: the largest cost to hold, the output cap to send
upstream, the body to forward; the metering code holds `Quote.largest` and settles `Quote.charge(...)`.
Customer input that cannot be priced (a bad `n`, a non-object `stream_options`, an input larger than
`max_reserve` pays for) is refused here with 400, before anything is held or forwarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import orjson
import yaml

from shared.errors import InvalidRequest

ONE_THOUSAND = Decimal(1000)
# Input tokens an image part of a message is held for (`image_input_tokens` overrides it per model).
# OpenAI's high detail bills a 2048x768 image at 1,105 tokens on gpt-4o and about 2,500 on gpt-4.1-mini;
# the charge follows the reported usage whatever this says, so it only sizes the hold.
DEFAULT_IMAGE_INPUT_TOKENS = 2_500
LOW_DETAIL_IMAGE_TOKENS = 85
# Output tokens one generated image may cost on a token-priced image model (gpt-image-1, high quality,
# 1536x1024).
IMAGE_OUTPUT_TOKENS = 6_240
# OpenAI's own bounds on items per request.
MAX_CHOICES = 128
MAX_IMAGES = 10


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


def _upstream_usd(entry: Any, where: str) -> UpstreamUsd:
    if not isinstance(entry, dict):
        raise PricingError(f"{where} must be a mapping")
    unknown = set(entry) - _USD_KEYS
    if unknown:
        raise PricingError(f"{where}: unknown keys {sorted(unknown)}")
    return UpstreamUsd(**{key: _number(value, f"{where}.{key}") for key, value in entry.items()})


def parse_price(entry: Any, where: str) -> Price:
    if not isinstance(entry, dict):
        raise PricingError(f"{where} must be a mapping")
    unknown = set(entry) - _PRICE_KEYS
    if unknown:
        raise PricingError(f"{where}: unknown keys {sorted(unknown)}")
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


# --- estimating a request's tokens before the call ------------------------------------------------


def estimate_tokens(text: str) -> int:
    """A deliberately high estimate of a text's tokens (no tokenizer on the hot path).

    English runs near 4 characters per token; counting one token per 3 characters, and never fewer
    than the number of words, keeps the estimate above the real count so the hold covers the input.
    """
    if not text:
        return 0
    if len(text) > 3000:
        # Words counted by their separators: splitting megabytes into a list of words costs more.
        return max(text.count(" ") + 1, math.ceil(len(text) / 3))
    return max(len(text.split()), math.ceil(len(text) / 3))


def _json_tokens(value: Any, image_tokens: int, *, count_keys: bool) -> int:
    """Tokens of every string in a JSON value (keys too, for schemas), images at `image_tokens` each.

    Iterative, so a deeply nested schema cannot exhaust the interpreter's stack.
    """
    total = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += estimate_tokens(item)
        elif isinstance(item, dict):
            kind = item.get("type")
            if kind == "image_url" or (kind is None and "image_url" in item):
                image = item.get("image_url")
                low = isinstance(image, dict) and image.get("detail") == "low"
                total += LOW_DETAIL_IMAGE_TOKENS if low else image_tokens
                continue
            for key, inner in item.items():
                if count_keys:
                    total += estimate_tokens(key)
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)
        elif item is not None:
            total += 1  # a number or a boolean
    return total


# Chat fields the upstream bills as input besides the messages (all rendered into the prompt).
_BILLED_CHAT_FIELDS = ("tools", "functions", "response_format", "tool_choice", "function_call", "prediction")


def estimate_input_tokens(
    operation: str, body: dict[str, Any], image_tokens: int = DEFAULT_IMAGE_INPUT_TOKENS
) -> int:
    if operation == "chat.completions":
        messages = body.get("messages")
        total = 0
        if isinstance(messages, list):
            for m in messages:
                if not isinstance(m, dict):
                    continue
                # A few tokens of framing per message, as OpenAI counts them.
                total += 4 + _json_tokens(m.get("content"), image_tokens, count_keys=False)
                for billed in ("tool_calls", "function_call", "name"):
                    if m.get(billed) is not None:
                        total += _json_tokens(m[billed], image_tokens, count_keys=True)
        for billed in _BILLED_CHAT_FIELDS:
            if body.get(billed) is not None:
                total += _json_tokens(body[billed], image_tokens, count_keys=True)
        return total
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
    if (
        not isinstance(input_tokens, int)
        or not isinstance(output_tokens, int)
        or isinstance(input_tokens, bool)
        or isinstance(output_tokens, bool)
        or input_tokens < 0
        or output_tokens < 0
    ):
        return None
    return input_tokens, output_tokens


def requested_output_cap(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def apply_output_cap(body: dict[str, Any], cap: int) -> None:
    """Lowers the request's output limit to `cap`, in the field the client used (the current one otherwise)."""
    if isinstance(body.get("max_tokens"), int) and "max_completion_tokens" not in body:
        body["max_tokens"] = cap
    else:
        body.pop("max_tokens", None)
        body["max_completion_tokens"] = cap


def _items(operation: str, body: dict[str, Any]) -> int:
    """`n`: the choices or images a request asks for, each priced on its own (400 when invalid)."""
    if operation == "chat.completions":
        limit = MAX_CHOICES
    elif operation == "images.generations":
        limit = MAX_IMAGES
    else:
        return 1
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise InvalidRequest(f"'n' must be a whole number from 1 to {limit}.")
    return n


# --- the quote of one request ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Charge:
    """What a served request costs: `credits` (never cut below what the reported usage costs), the
    tokens the upstream reported (None when it reported none) and the operator's upstream cost."""

    credits: int
    input_tokens: int | None = None
    output_tokens: int | None = None
    upstream_cost_usd: float | None = None


@dataclass(slots=True)
class Quote:
    """The price of one request, decided once: what to hold, what to send upstream, how to charge."""

    operation: str
    model: str | None
    price: Price
    body: dict[str, Any]
    raw: bytes
    # `n` choices or images.
    items: int = 1
    # The estimated input tokens the hold was sized for (token prices).
    input_tokens: int = 0
    # The output limit per item to send upstream; None leaves the request's own.
    output_cap: int | None = None
    # The credits to hold: the most this request may cost.
    largest: int = 0
    stream: bool = False
    # False when the proxy asked for the stream's usage chunk: then it is not forwarded.
    client_wants_usage: bool = True
    # The body was changed (usage asked for) and must be serialised again.
    changed: bool = field(default=False)

    def forward(self) -> bytes:
        """The bytes to send upstream: the client's own unless the quote changed the request."""
        changed = self.changed
        if self.output_cap is not None and requested_output_cap(self.body) != self.output_cap:
            apply_output_cap(self.body, self.output_cap)
            changed = True
        return orjson.dumps(self.body) if changed else self.raw

    def fitted(self, available: int) -> Quote | None:
        """This quote shrunk to `available` credits by lowering the output cap (token-priced chat), or
        None when the request's input (or its fixed price) is more than that."""
        if self.largest <= available:
            return self
        if self.price.per_request is not None or self.operation != "chat.completions":
            return None
        allowed = self.price.output_tokens_within(available, self.input_tokens) // self.items
        if allowed < 1:
            return None
        if self.output_cap is not None:
            allowed = min(allowed, self.output_cap)
        return replace(self, largest=available, output_cap=allowed)

    def charge(self, usage: Any, output_served: int | None = None) -> Charge:
        """What the request costs. Per-request prices: the price times the items. Token prices: the
        tokens the upstream reported, at their full cost even beyond the hold; without usage, the
        input estimate plus the `output_served` tokens counted while relaying a stream (at most the
        hold), or the hold when nothing was counted (the most the caller agreed to pay)."""
        reported = usage_tokens(usage)
        price = self.price
        if price.per_request is not None:
            credits = price.per_request * self.items
        elif reported is not None:
            credits = price.tokens_cost(*reported)
        elif output_served is not None:
            credits = min(self.largest, price.tokens_cost(self.input_tokens, output_served))
        else:
            credits = self.largest
        cost = None
        if price.upstream_usd is not None:
            tokens = reported or (self.input_tokens, output_served or 0)
            cost = price.upstream_usd.cost(self.items, *tokens)
        return Charge(
            credits,
            reported[0] if reported else None,
            reported[1] if reported else None,
            cost,
        )

    def details(self, charge: Charge) -> dict[str, Any]:
        """The `details` of the usage ledger entry (docs/api.md, Credits)."""
        return {
            "operation": self.operation,
            "model": ledger_label(self.model),
            # Within what credits stores: a figure it refuses would bounce the whole settlement batch.
            "input_tokens": _bounded(charge.input_tokens, MAX_LEDGER_TOKENS),
            "output_tokens": _bounded(charge.output_tokens, MAX_LEDGER_TOKENS),
            "upstream_cost_usd": _bounded(charge.upstream_cost_usd, MAX_LEDGER_COST_USD),
        }


# What credits keeps on a usage entry: at most this many characters of a model name, token counts
# and an upstream cost up to these bounds.
MAX_LABEL_CHARS = 200
MAX_LEDGER_TOKENS = 10**12
MAX_LEDGER_COST_USD = 1e6
_Number = TypeVar("_Number", int, float)


def _bounded(value: _Number | None, most: _Number) -> _Number | None:
    return None if value is None else min(value, most)


def ledger_label(model: str | None) -> str | None:
    """The model name as credits stores it: printable characters only, at most MAX_LABEL_CHARS. The
    name is the customer's text; one credits would refuse must not make a whole settlement batch
    (other users' charges with it) bounce."""
    if model is None:
        return None
    label = "".join(c for c in model if c.isprintable())[:MAX_LABEL_CHARS]
    return label or None


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

    def quote(self, operation: str, body: dict[str, Any], raw: bytes) -> Quote:
        """The quote of one request (`body` is `raw` parsed; the quote may change it before forwarding).
        Raises InvalidRequest for input that cannot be priced."""
        model = body.get("model")
        model = model if isinstance(model, str) else None
        price = self.price(model)
        quote = Quote(operation, model, price, body, raw, items=_items(operation, body))
        is_chat = operation == "chat.completions"
        if is_chat:
            quote.stream = body.get("stream") is True
            options = body.get("stream_options")
            if options is not None and not isinstance(options, dict):
                raise InvalidRequest("'stream_options' must be an object.")
            if quote.stream and price.per_token and not (options and options.get("include_usage") is True):
                # Ask for the usage chunk to price the stream; it is not forwarded to this client.
                body["stream_options"] = {**(options or {}), "include_usage": True}
                quote.client_wants_usage = False
                quote.changed = True
        requested = requested_output_cap(body) if is_chat else None
        limit = requested
        if (
            is_chat
            and price.max_output_tokens is not None
            and (limit is None or limit > price.max_output_tokens)
        ):
            limit = price.max_output_tokens
            quote.output_cap = limit
        if price.per_request is not None:
            quote.largest = price.per_request * quote.items
            return quote
        quote.input_tokens = estimate_input_tokens(operation, body, price.image_input_tokens)
        if not is_chat:
            # Embeddings have no output; a token-priced image model bills each image's output.
            output = IMAGE_OUTPUT_TOKENS * quote.items if operation == "images.generations" else 0
            quote.largest = max(1, price.tokens_cost(quote.input_tokens, output))
            if quote.largest > price.max_reserve:
                raise _too_large(quote)
            return quote
        if limit is not None:
            wanted = max(1, price.tokens_cost(quote.input_tokens, limit * quote.items))
            if wanted <= price.max_reserve:
                quote.largest = wanted
                return quote
        # Hold `max_reserve` and lower the output of each item to what it leaves after the input.
        allowed = price.output_tokens_within(price.max_reserve, quote.input_tokens) // quote.items
        if allowed < 1:
            raise _too_large(quote)
        quote.output_cap = allowed if limit is None else min(allowed, limit)
        quote.largest = price.max_reserve
        return quote

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


def _too_large(quote: Quote) -> InvalidRequest:
    return InvalidRequest(
        f"This request is too large for model {quote.model or 'default'}: its input is estimated at "
        f"{quote.input_tokens} tokens, more than one request may cost ({quote.price.max_reserve} credits). "
        "Send less input or fewer items."
    )
