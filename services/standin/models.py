"""``GET /v1/models`` and ``GET /v1/models/{id}``: a fixed list; any other id is answered as if it existed."""

from __future__ import annotations

import orjson

from .responder import Call, Responder

MODELS = (
    ("gpt-4o-mini", 1721172741, "system"),
    ("gpt-4o", 1715367049, "system"),
    ("gpt-4.1-mini", 1744318173, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
    ("text-embedding-3-large", 1705953180, "system"),
    ("dall-e-3", 1698785189, "system"),
    ("gpt-image-1", 1745517030, "system"),
)
_MODELS = {
    m: {"id": m, "object": "model", "created": created, "owned_by": owner} for m, created, owner in MODELS
}
_LIST_BODY = orjson.dumps({"object": "list", "data": list(_MODELS.values())})


async def list_models(responder: Responder, call: Call) -> None:
    knobs = await responder.admit(call, None)
    if knobs is not None:
        await responder.answer(call.send, _LIST_BODY, knobs)


def model_body(model_id: str) -> bytes:
    model = _MODELS.get(model_id) or {
        "id": model_id,
        "object": "model",
        "created": 1700000000,
        "owned_by": "standin",
    }
    return orjson.dumps(model)
