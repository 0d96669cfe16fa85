"""The pricing table: `PRICING_FILE` (docs/api.md, Proxy) loaded and checked once per process, a price
per model, and `PricingTable.quote`, which decides what one request may cost into a `Quote`.

A stream on a token-priced model asks upstream for its usage chunk (not forwarded to a client that did
not ask for it); a non-object `stream_options` is refused with 400 here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shared.errors import InvalidRequest

from .prices import DEFAULT_PRICE, Price, PricingError, parse_price
from .quote import (
    IMAGE_OUTPUT_TOKENS,
    Quote,
    estimate_input_tokens,
    items_requested,
    requested_output_cap,
    too_large,
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

    def quote(self, operation: str, body: dict[str, Any], raw: bytes) -> Quote:
        """The quote of one request (`body` is `raw` parsed; the quote may change it before forwarding).
        Raises InvalidRequest for input that cannot be priced."""
        model = body.get("model")
        model = model if isinstance(model, str) else None
        price = self.price(model)
        quote = Quote(operation, model, price, body, raw, items=items_requested(operation, body))
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
                raise too_large(quote)
            return quote
        if limit is not None:
            wanted = max(1, price.tokens_cost(quote.input_tokens, limit * quote.items))
            if wanted <= price.max_reserve:
                quote.largest = wanted
                return quote
        # Hold `max_reserve` and lower the output of each item to what it leaves after the input.
        allowed = price.output_tokens_within(price.max_reserve, quote.input_tokens) // quote.items
        if allowed < 1:
            raise too_large(quote)
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
