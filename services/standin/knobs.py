"""Per-request behaviour switches, chosen by request header or by model name.

Headers win over the model name, which wins over the server config. Both forms exist because a
gateway in front of the stand-in may drop headers it does not know but always forwards ``model``.

Headers (case-insensitive):

- ``X-Standin-Fail``: an HTTP status ``400``-``599`` (answered with OpenAI's error body),
  ``timeout`` (hold the request until the client gives up), ``drop`` (cut the TCP connection
  after ``X-Standin-Drop-After`` stream events; without a stream, mid-body), or ``stall``
  (send ``X-Standin-Stall-After`` events, then go silent until the client gives up).
- ``X-Standin-Drop-After: N`` / ``X-Standin-Stall-After: N``: imply ``drop`` / ``stall``.
- ``X-Standin-Latency-Ms: N``: delay before the first response byte.
- ``X-Standin-Chunk-Delay-Ms: N``: delay between stream events.
- ``X-Standin-Reply-Words: N``: reply with exactly N words (still capped by ``max_tokens``).
- ``X-Standin-Bill-Tokens: N``: report N more prompt tokens in ``usage`` than the request has (an
  upstream that bills input the gateway cannot see, e.g. its own system prompt).

Model names starting with ``standin-`` carry the same knobs as dash-separated tokens, which
combine freely: ``standin-fail-500``, ``standin-fail-429``, ``standin-timeout``, ``standin-drop``,
``standin-drop-after-3``, ``standin-stall-after-2``, ``standin-slow-200`` (latency ms),
``standin-trickle-50`` (chunk delay ms), ``standin-words-100``, ``standin-bill-500``, e.g.
``standin-slow-50-words-20-drop-after-5``. The bare name ``standin`` has no knobs. An unknown
token or header is a 400, so a typo cannot silently turn a failure test into a passing one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .config import StandinConfig

MODEL_PREFIX = "standin-"


class KnobError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Overrides:
    fail_status: int | None = None
    timeout: bool = False
    drop: bool = False
    drop_after: int | None = None
    stall: bool = False
    stall_after: int | None = None
    latency_ms: float | None = None
    chunk_delay_ms: float | None = None
    reply_words: int | None = None
    bill_tokens: int | None = None


NO_OVERRIDES = Overrides()


@dataclass(frozen=True, slots=True)
class Knobs:
    fail_status: int | None
    timeout: bool
    # None: the stream runs to completion.
    drop_after: int | None
    stall_after: int | None
    latency_s: float
    chunk_delay_s: float
    reply_words: int | None
    bill_tokens: int


def _count(value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise KnobError(f"stand-in knob {what} needs a whole number, got {value!r}") from None
    if n < 0:
        raise KnobError(f"stand-in knob {what} must not be negative")
    return n


def _status(value: str) -> int:
    n = _count(value, "fail")
    if not 400 <= n <= 599:
        raise KnobError(f"stand-in fail status must be 400-599, got {n}")
    return n


@lru_cache(maxsize=256)
def parse_model(model: str) -> Overrides:
    if not model.startswith(MODEL_PREFIX):
        return NO_OVERRIDES
    tokens = model[len(MODEL_PREFIX) :].split("-")
    fields: dict[str, object] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        arg = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token == "fail":
            fields["fail_status"] = _status(arg)
            i += 2
        elif token == "timeout":
            fields["timeout"] = True
            i += 1
        elif token in ("drop", "stall"):
            fields[token] = True
            if arg == "after":
                after = tokens[i + 2] if i + 2 < len(tokens) else ""
                fields[f"{token}_after"] = _count(after, f"{token}-after")
                i += 3
            else:
                i += 1
        elif token == "slow":
            fields["latency_ms"] = float(_count(arg, "slow"))
            i += 2
        elif token == "trickle":
            fields["chunk_delay_ms"] = float(_count(arg, "trickle"))
            i += 2
        elif token == "words":
            fields["reply_words"] = _count(arg, "words")
            i += 2
        elif token == "bill":
            fields["bill_tokens"] = _count(arg, "bill")
            i += 2
        else:
            raise KnobError(
                f"unknown stand-in knob {token!r} in model {model!r}; known: fail-<status>, timeout, "
                "drop[-after-<n>], stall[-after-<n>], slow-<ms>, trickle-<ms>, words-<n>, bill-<n>"
            )
    return Overrides(**fields)  # type: ignore[arg-type]


def parse_headers(headers: dict[bytes, bytes]) -> Overrides:
    """``headers`` holds only the ``x-standin-*`` request headers, names lower-cased."""
    fields: dict[str, object] = {}
    for raw_name, raw_value in headers.items():
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1").strip()
        if name == "x-standin-fail":
            mode = value.lower()
            if mode in ("timeout", "drop", "stall"):
                fields[mode] = True
            else:
                fields["fail_status"] = _status(value)
        elif name == "x-standin-drop-after":
            fields["drop"] = True
            fields["drop_after"] = _count(value, name)
        elif name == "x-standin-stall-after":
            fields["stall"] = True
            fields["stall_after"] = _count(value, name)
        elif name == "x-standin-latency-ms":
            fields["latency_ms"] = float(_count(value, name))
        elif name == "x-standin-chunk-delay-ms":
            fields["chunk_delay_ms"] = float(_count(value, name))
        elif name == "x-standin-reply-words":
            fields["reply_words"] = _count(value, name)
        elif name == "x-standin-bill-tokens":
            fields["bill_tokens"] = _count(value, name)
        else:
            raise KnobError(f"unknown stand-in header {name!r}")
    return Overrides(**fields)  # type: ignore[arg-type]


def resolve(config: StandinConfig, model: Overrides, header: Overrides) -> Knobs:
    def pick(name: str) -> object:
        value = getattr(header, name)
        return value if value is not None else getattr(model, name)

    fail_status = pick("fail_status")
    latency_ms = pick("latency_ms")
    chunk_delay_ms = pick("chunk_delay_ms")
    reply_words = pick("reply_words")
    bill_tokens = pick("bill_tokens")
    drop_after: int | None = None
    if header.drop or model.drop:
        after = pick("drop_after")
        drop_after = after if isinstance(after, int) else config.drop_after
    stall_after: int | None = None
    if header.stall or model.stall:
        after = pick("stall_after")
        stall_after = after if isinstance(after, int) else config.drop_after
    return Knobs(
        fail_status=fail_status if isinstance(fail_status, int) else None,
        timeout=header.timeout or model.timeout,
        drop_after=drop_after,
        stall_after=stall_after,
        latency_s=(latency_ms if isinstance(latency_ms, float) else config.latency_ms) / 1000.0,
        chunk_delay_s=(chunk_delay_ms if isinstance(chunk_delay_ms, float) else config.stream_chunk_delay_ms)
        / 1000.0,
        reply_words=reply_words if isinstance(reply_words, int) else config.reply_words,
        bill_tokens=bill_tokens if isinstance(bill_tokens, int) else 0,
    )
