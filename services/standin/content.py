"""Deterministic fake model output.

A token is a whitespace-separated word, so tests can predict usage exactly:
``prompt_tokens`` is the number of words in every billed input of a chat request (text content of
the messages, their tool calls, ``tools``/``functions`` and ``response_format``, as JSON text) plus
``IMAGE_TOKENS`` per image part, ``completion_tokens`` the number of words in the reply,
``total_tokens`` their sum.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from functools import lru_cache
from typing import Any

import orjson

REPLY_PREFIX = ("Stand-in", "reply:")
EMBEDDING_DIMENSIONS = {"text-embedding-3-large": 3072}

# A valid 1x1 PNG: enough for clients that decode what they receive.
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
PNG_BYTES = base64.b64decode(PNG_B64)


def count_tokens(text: str) -> int:
    return len(text.split())


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


# What one image part of a message costs, as OpenAI's high detail bills a 512 px tile plus its base.
IMAGE_TOKENS = 255


def _image_parts(content: Any) -> int:
    if not isinstance(content, list):
        return 0
    return sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image_url")


def prompt_tokens(messages: list[dict[str, Any]], body: dict[str, Any] | None = None) -> int:
    tokens = 0
    for m in messages:
        tokens += count_tokens(message_text(m.get("content"))) + IMAGE_TOKENS * _image_parts(m.get("content"))
        if m.get("tool_calls") is not None:
            tokens += count_tokens(json_text(m["tool_calls"]))
    if body is not None:
        for field in ("tools", "functions", "response_format"):
            if body.get(field) is not None:
                tokens += count_tokens(json_text(body[field]))
    return tokens


def json_text(value: Any) -> str:
    """A JSON value as text whose words count like its content's (punctuation as separators)."""
    text = orjson.dumps(value).decode()
    return text.translate(_JSON_SEPARATORS)


_JSON_SEPARATORS = str.maketrans({c: " " for c in '{}[]":,'})


def reply_words(messages: list[dict[str, Any]], fixed_length: int | None) -> list[str]:
    last_user = next(
        (message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    words = [*REPLY_PREFIX, *last_user.split()]
    if fixed_length is None:
        return words
    if fixed_length <= len(words):
        return words[:fixed_length]
    return [words[i % len(words)] for i in range(fixed_length)]


def embedding_dimensions(model: str, requested: int | None, default: int) -> int:
    if requested is not None:
        return requested
    return EMBEDDING_DIMENSIONS.get(model, default)


@lru_cache(maxsize=2048)
def embedding(text: str, dimensions: int) -> tuple[float, ...]:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    rng = random.Random(seed)
    vector = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    # Rounded through float32 so the float and base64 encodings carry identical values.
    packed = struct.pack(f"<{dimensions}f", *(x / norm for x in vector))
    return struct.unpack(f"<{dimensions}f", packed)


def embedding_base64(vector: tuple[float, ...]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embedding_inputs(value: Any) -> list[tuple[str, int]] | None:
    """(cache key, token count) per input, or None when ``input`` has no valid shape."""
    if isinstance(value, str):
        return [(value, count_tokens(value))] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(x, str) and x for x in value):
        return [(x, count_tokens(x)) for x in value]
    if all(isinstance(x, int) for x in value):
        return [(repr(value), len(value))]
    if all(isinstance(x, list) and x and all(isinstance(t, int) for t in x) for x in value):
        return [(repr(x), len(x)) for x in value]
    return None
