"""``POST /v1/images/generations``: a 1x1 PNG, as a URL on the stand-in or inline base64."""

from __future__ import annotations

import time
from typing import Any

import orjson

from . import content
from .errors import invalid, missing, optional_int
from .responder import Call, Responder


async def images(responder: Responder, call: Call) -> None:
    body = call.body
    prompt = body.get("prompt")
    if prompt is None:
        raise missing("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("prompt", "Invalid 'prompt': expected a non-empty string.")
    model = body.get("model") or "dall-e-2"
    if not isinstance(model, str):
        raise invalid("model", "Invalid 'model': expected a string.")
    gpt_image = model.startswith("gpt-image")
    response_format = body.get("response_format") or ("b64_json" if gpt_image else "url")
    if response_format not in ("url", "b64_json") or (gpt_image and response_format != "b64_json"):
        raise invalid("response_format", f"Invalid 'response_format' for {model}: {response_format!r}.")
    n = optional_int(body, "n", 1, 10) or 1
    knobs = await responder.admit(call, model)
    if knobs is None:
        return
    data: list[dict[str, Any]] = []
    for _ in range(n):
        if response_format == "url":
            host = dict(call.scope["headers"]).get(b"host", b"localhost").decode("latin-1")
            item: dict[str, Any] = {"url": f"http://{host}/_standin/images/{responder.next_id()}.png"}
        else:
            item = {"b64_json": content.PNG_B64}
        if model == "dall-e-3":
            item["revised_prompt"] = prompt
        data.append(item)
    response: dict[str, Any] = {"created": int(time.time()), "data": data}
    if gpt_image:
        tokens = content.count_tokens(prompt)
        response["usage"] = {
            "input_tokens": tokens,
            "output_tokens": 272 * n,
            "total_tokens": tokens + 272 * n,
            "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0},
        }
    await responder.answer(call.send, orjson.dumps(response), knobs)
