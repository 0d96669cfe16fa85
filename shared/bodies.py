"""JSON bodies parsed after authentication.

FastAPI parses a declared body before any dependency runs, so a caller without a token who sent
malformed JSON was answered 422 instead of 401 (docs/api.md, Conventions). Routes take their body through
`json_body(Model)` instead: a dependency, solved after the route's and router's auth dependencies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


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
