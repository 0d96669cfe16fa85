"""Validate payloads against OpenAI's own OpenAPI schemas (the subset vendored in ``tests/specs``).

The spec is run through ``tests/specs/normalize_openai_spec.py`` the way its docstring describes
(``nullable`` rewritten into null-accepting schemas, plus ``--allow-null-usage`` for stream chunks),
then checked as JSON Schema 2020-12 with format checking, so a ``null`` where OpenAI never sends one
fails, and so does a missing required field or a wrong type or enum value.

    from tests.openai_schema import validate
    validate("CreateChatCompletionResponse", body)   # raises jsonschema.ValidationError
"""

from __future__ import annotations

import copy
import importlib.util
import json
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# Vendored copies of the providers' published specs (see tests/specs/README.md).
SPECS_DIR = Path(__file__).resolve().parent / "specs"
SPEC_FILE = SPECS_DIR / "openai-openapi.subset.json"
NORMALIZER_FILE = SPECS_DIR / "normalize_openai_spec.py"
_SPEC_URI = "urn:openai:openapi"

ValidationError = jsonschema.ValidationError

# The component names tests usually want, per endpoint.
CHAT_COMPLETION = "CreateChatCompletionResponse"
CHAT_COMPLETION_CHUNK = "CreateChatCompletionStreamResponse"
MODEL_LIST = "ListModelsResponse"
MODEL = "Model"
EMBEDDINGS = "CreateEmbeddingResponse"
IMAGES = "ImagesResponse"
ERROR = "ErrorResponse"


def _normalizer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("normalize_openai_spec", NORMALIZER_FILE)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {NORMALIZER_FILE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accepts_null(schema: dict[str, Any]) -> bool:
    if schema.get("type") == "null" or "null" in (schema.get("type") or []):
        return True
    return any(_accepts_null(s) for s in schema.get("anyOf", []) + schema.get("oneOf", []))


@cache
def spec() -> dict[str, Any]:
    """The normalised spec; treat it as read-only."""
    loaded = json.loads(SPEC_FILE.read_text())
    normalized: dict[str, Any] = _normalizer().fix(loaded)
    # Same edit as the normaliser's --allow-null-usage, skipped when the subset already has it
    # so the schema does not grow another needless anyOf layer.
    chunk = normalized["components"]["schemas"][CHAT_COMPLETION_CHUNK]["properties"]
    if not _accepts_null(chunk["usage"]):
        chunk["usage"] = {"anyOf": [chunk["usage"], {"type": "null"}]}
    return normalized


def schema_names() -> list[str]:
    return sorted(spec()["components"]["schemas"])


@cache
def _registry() -> Registry:
    return Registry().with_resource(_SPEC_URI, Resource(contents=spec(), specification=DRAFT202012))


@cache
def validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in spec()["components"]["schemas"]:
        raise KeyError(f"no component schema {schema_name!r} in {SPEC_FILE.name}")
    return Draft202012Validator(
        {"$ref": f"{_SPEC_URI}#/components/schemas/{schema_name}"},
        registry=_registry(),
        format_checker=FormatChecker(),
    )


def validate(schema_name: str, obj: Any) -> None:
    """Raise ``jsonschema.ValidationError`` (the most relevant error) when ``obj`` does not match."""
    error = jsonschema.exceptions.best_match(validator(schema_name).iter_errors(obj))
    if error is not None:
        raise error


def validate_sse_event(data: str) -> dict[str, Any] | None:
    """Validate one ``data:`` payload of a chat stream; None for the ``[DONE]`` sentinel."""
    if data == "[DONE]":
        return None
    chunk: dict[str, Any] = json.loads(data)
    validate(CHAT_COMPLETION_CHUNK, chunk)
    return chunk


def component(schema_name: str) -> dict[str, Any]:
    """A copy of one normalised component schema, e.g. to inspect required fields."""
    return copy.deepcopy(spec()["components"]["schemas"][schema_name])
