"""The schema helper is strict where OpenAI is: it is the yardstick for every other test."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.openai_schema import SPEC_FILE, ValidationError, schema_names, validate

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}
CHUNK: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None}],
    "usage": None,
}


def test_spec_is_found_beside_the_repository() -> None:
    assert SPEC_FILE.is_file()
    names = set(schema_names())
    assert {
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        "ListModelsResponse",
        "CreateEmbeddingResponse",
        "ImagesResponse",
        "ErrorResponse",
    } <= names


def test_valid_payloads_pass() -> None:
    validate("CreateChatCompletionResponse", COMPLETION)
    validate("CreateChatCompletionStreamResponse", CHUNK)
    validate("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None, "code": None}})


@pytest.mark.parametrize(
    ("schema", "base", "path", "value"),
    [
        ("CreateChatCompletionResponse", COMPLETION, ("choices", 0, "finish_reason"), None),
        ("CreateChatCompletionResponse", COMPLETION, ("choices", 0, "finish_reason"), "done"),
        ("CreateChatCompletionResponse", COMPLETION, ("object",), "chat.completion.chunk"),
        ("CreateChatCompletionResponse", COMPLETION, ("created",), "yesterday"),
        ("CreateChatCompletionResponse", COMPLETION, ("usage",), None),
        ("CreateChatCompletionStreamResponse", CHUNK, ("choices", 0, "index"), None),
    ],
)
def test_wrong_values_fail(
    schema: str, base: dict[str, Any], path: tuple[str | int, ...], value: Any
) -> None:
    payload = copy.deepcopy(base)
    target: Any = payload
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValidationError):
        validate(schema, payload)


def test_missing_required_fields_fail() -> None:
    for field in ("id", "choices", "created", "model", "object"):
        payload = {k: v for k, v in COMPLETION.items() if k != field}
        with pytest.raises(ValidationError):
            validate("CreateChatCompletionResponse", payload)
    message = copy.deepcopy(COMPLETION)
    del message["choices"][0]["message"]["refusal"]
    with pytest.raises(ValidationError):
        validate("CreateChatCompletionResponse", message)
    with pytest.raises(ValidationError):
        validate("ErrorResponse", {"error": {"message": "m", "type": "t"}})


def test_unknown_schema_name_is_an_error() -> None:
    with pytest.raises(KeyError):
        validate("NoSuchSchema", {})
