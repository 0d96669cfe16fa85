"""Stand-in settings, read once at start from ``STANDIN_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


def _flag(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True, slots=True)
class StandinConfig:
    # Added before the first response byte of every request (time to first byte).
    latency_ms: float = 0.0
    # Added between two stream events.
    stream_chunk_delay_ms: float = 0.0
    # When set, only this exact bearer key is accepted; otherwise any key is.
    api_key: str | None = None
    # False accepts requests that carry no Authorization header at all.
    require_auth: bool = True
    # How long a "timeout" knob holds a request: longer than any client waits.
    hang_seconds: float = 3600.0
    # Events sent before a "drop"/"stall" knob without an explicit count cuts the stream.
    drop_after: int = 2
    embedding_dimensions: int = 1536
    # Fixed reply length in words; None derives the reply from the last user message.
    reply_words: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StandinConfig:
        env = os.environ if env is None else env
        reply_words = env.get("STANDIN_REPLY_WORDS", "").strip()
        return cls(
            latency_ms=float(env.get("STANDIN_LATENCY_MS", "0") or 0),
            stream_chunk_delay_ms=float(env.get("STANDIN_STREAM_CHUNK_DELAY_MS", "0") or 0),
            api_key=env.get("STANDIN_API_KEY") or None,
            require_auth=_flag(env.get("STANDIN_REQUIRE_AUTH", "1")),
            hang_seconds=float(env.get("STANDIN_HANG_SECONDS", "3600") or 3600),
            drop_after=int(env.get("STANDIN_DROP_AFTER", "2") or 2),
            embedding_dimensions=int(env.get("STANDIN_EMBEDDING_DIMENSIONS", "1536") or 1536),
            reply_words=int(reply_words) if reply_words else None,
        )
