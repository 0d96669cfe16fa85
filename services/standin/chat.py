"""``POST /v1/chat/completions``: one JSON answer, or with ``stream: true`` server-sent events that
the drop, stall and trickle knobs can cut short or slow down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from . import content
from .asgi import SSE, disconnected
from .errors import drop_connection, invalid, missing, optional_int, required_model
from .knobs import Knobs
from .responder import Call, Responder

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_DONE = b"data: [DONE]\n\n"


async def chat(responder: Responder, call: Call) -> None:
    body = call.body
    model = required_model(body)
    messages = body.get("messages")
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "Invalid 'messages': expected a non-empty array of message objects.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise invalid(
                f"messages[{i}]", f"Invalid 'messages[{i}]': expected an object with a valid 'role'."
            )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", "Invalid 'stream': expected a boolean.")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise invalid(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            )
        if not isinstance(stream_options, dict):
            raise invalid("stream_options", "Invalid 'stream_options': expected an object.")
    max_tokens = optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", 1)
    n = optional_int(body, "n", 1, 128) or 1

    knobs = await responder.admit(call, model, bool(stream))
    if knobs is None:
        return

    words = content.reply_words(messages, knobs.reply_words)
    finish_reason = "stop"
    if max_tokens is not None and len(words) > max_tokens:
        words = words[:max_tokens]
        finish_reason = "length"
    prompt_tokens = content.prompt_tokens(messages, body) + knobs.bill_tokens
    usage = _usage(prompt_tokens, len(words) * n)
    completion_id = f"chatcmpl-{responder.next_id()}"
    created = int(time.time())
    if stream:
        include_usage = bool(stream_options and stream_options.get("include_usage"))
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_standin",
        }
        events = partial(_stream_events, head, words, n, finish_reason, usage if include_usage else None)
        await _stream(responder, call, knobs, events)
        return
    text = " ".join(words)
    response = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            for i in range(n)
        ],
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_standin",
    }
    await responder.answer(call.send, orjson.dumps(response), knobs)


def _stream_events(
    head: dict[str, Any], words: list[str], n: int, finish_reason: str, usage: dict[str, Any] | None
) -> list[bytes]:
    if usage is not None:
        head["usage"] = None

    def event(index: int, delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    out: list[bytes] = []
    for i in range(n):
        out.append(event(i, {"role": "assistant", "content": "", "refusal": None}, None))
        out.extend(event(i, {"content": w if j == 0 else " " + w}, None) for j, w in enumerate(words))
        out.append(event(i, {}, finish_reason))
    if usage is not None:
        out.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
    return out


async def _stream(responder: Responder, call: Call, knobs: Knobs, events: Callable[[], list[bytes]]) -> None:
    """Send ``events()`` (built once the headers are out) as server-sent events, cut as the knobs say."""
    send = call.send
    stats = responder.stats.streams
    stats["started"] += 1
    responder.stats.by_status[200] += 1
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                SSE,
                (b"cache-control", b"no-cache"),
                (b"x-request-id", f"req_{responder.next_id()}".encode()),
            ],
        }
    )
    cut_at = knobs.drop_after if knobs.drop_after is not None else knobs.stall_after
    delay = knobs.chunk_delay_s
    # Watching for a disconnect costs a task, so only slow streams do it.
    watcher = asyncio.ensure_future(disconnected(call.receive)) if delay > 0 else None
    try:
        for sent, chunk in enumerate(events()):
            if sent == cut_at:
                break
            if sent and delay > 0:
                await asyncio.sleep(delay)
            if watcher is not None and watcher.done():
                stats["disconnected"] += 1
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if knobs.drop_after is not None:
            stats["dropped"] += 1
            raise drop_connection()
        if knobs.stall_after is not None:
            stats["stalled"] += 1
            await responder.hold(watcher or asyncio.ensure_future(disconnected(call.receive)))
            # Whether the client left or the hang ran out, the stream ends unfinished.
            raise drop_connection()
        await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        stats["completed"] += 1
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
