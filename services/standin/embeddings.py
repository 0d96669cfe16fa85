"""``POST /v1/embeddings``: deterministic vectors, as floats or base64."""

from __future__ import annotations

import orjson

from . import content
from .errors import invalid, missing, optional_int, required_model
from .responder import Call, Responder


async def embeddings(responder: Responder, call: Call) -> None:
    body = call.body
    model = required_model(body)
    if "input" not in body:
        raise missing("input")
    inputs = content.embedding_inputs(body["input"])
    if inputs is None:
        raise invalid(
            "input",
            "Invalid 'input': expected a non-empty string, array of strings, or array of token arrays.",
        )
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format", "Invalid 'encoding_format': expected 'float' or 'base64'.")
    dimensions = content.embedding_dimensions(
        model, optional_int(body, "dimensions", 1, 3072), responder.config.embedding_dimensions
    )
    knobs = await responder.admit(call, model)
    if knobs is None:
        return
    data = []
    for index, (text, _) in enumerate(inputs):
        vector = content.embedding(text, dimensions)
        data.append(
            {
                "object": "embedding",
                "index": index,
                "embedding": content.embedding_base64(vector) if encoding == "base64" else vector,
            }
        )
    tokens = sum(count for _, count in inputs)
    response = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    await responder.answer(call.send, orjson.dumps(response), knobs)
