"""JSON bodies parsed after authentication.

FastAPI parses a declared body before any dependency runs, so a caller without a token who sent
malformed JSON was answered 422 instead of 401 (docs/api.md, Conventions). Routes take their body through
`json_body(Model)` instead: a dependency, solved after the route's and router's auth dependencies.

Every request body model derives from `RequestBody`, which refuses text PostgreSQL cannot store (a
NUL character; unpaired surrogates are already invalid JSON to pydantic) at parsing, so such a
value is a 422 before any route acts on it instead of a database error after it started writing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Self, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

ModelT = TypeVar("ModelT", bound=BaseModel)


def storable_text(value: Any) -> bool:
    """False when `value` (a string, or a list or dict holding strings) has a NUL character, which
    PostgreSQL refuses in `text` and `jsonb`. Nested models check themselves."""
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, list | tuple):
        return all(storable_text(v) for v in value)
    if isinstance(value, dict):
        return all(storable_text(k) and storable_text(v) for k, v in value.items())
    return True


class RequestBody(BaseModel):
    """Base of request bodies: unknown fields ignored, text PostgreSQL cannot store refused."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="after")
    def _storable_text(self) -> Self:
        for name, value in self.__dict__.items():
            if not storable_text(value):
                raise ValueError(f"{name}: must not contain NUL characters")
        return self


def json_body(model: type[ModelT]) -> Callable[[Request], Awaitable[ModelT]]:
    async def parse(request: Request) -> ModelT:
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None

    return parse


def optional_json_body(model: type[ModelT]) -> Callable[[Request], Awaitable[ModelT | None]]:
    """Like `json_body`, but an empty body means None."""

    async def parse(request: Request) -> ModelT | None:
        raw = await request.body()
        if not raw.strip():
            return None
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None

    return parse
