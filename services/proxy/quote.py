"""The `Quote` of one request: what it may cost (its billed input counted before the call, its output
capped), the body to forward, and what it is charged once served (`Charge`, and the `details` of its
usage entry at credits).

The metering code holds `Quote.largest` and settles `Quote.charge(...)`; `pricing.PricingTable.quote`
builds the quote. Customer input that cannot be priced (a bad `n`, an input larger than `max_reserve`
pays for) is refused with 400, before anything is held or forwarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import orjson

from shared.errors import InvalidRequest

from .prices import DEFAULT_IMAGE_INPUT_TOKENS, Price

LOW_DETAIL_IMAGE_TOKENS = 85
# Output tokens one generated image may cost on a token-priced image model (gpt-image-1, high quality,
# 1536x1024).
IMAGE_OUTPUT_TOKENS = 6_240
# OpenAI's own bounds on items per request.
MAX_CHOICES = 128
MAX_IMAGES = 10


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


def items_requested(operation: str, body: dict[str, Any]) -> int:
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


def too_large(quote: Quote) -> InvalidRequest:
    return InvalidRequest(
        f"This request is too large for model {quote.model or 'default'}: its input is estimated at "
        f"{quote.input_tokens} tokens, more than one request may cost ({quote.price.max_reserve} credits). "
        "Send less input or fewer items."
    )
