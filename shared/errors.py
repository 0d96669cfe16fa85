"""The error envelope (docs/api.md, Conventions) and the handlers that produce it everywhere.

Domain code raises an `AppError` subclass carrying its HTTP status and code; one set of handlers
maps those, validation failures, unknown routes and unhandled exceptions to the same envelope.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.responses import JsonResponse

log = logging.getLogger("shared.errors")


class AppError(Exception):
    status_code: int = 400
    code: str = "invalid_request"
    type: str = "invalid_request_error"
    default_message: str = "Invalid request."

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.headers = headers
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return error_body(self.type, self.code, self.message)


class InvalidRequest(AppError):
    pass


class InvalidApiKey(AppError):
    status_code, code, type = 401, "invalid_api_key", "authentication_error"
    default_message = "Invalid API key."


class Unauthorized(AppError):
    status_code, code, type = 401, "unauthorized", "authentication_error"
    default_message = "Missing or invalid credentials."


class Forbidden(AppError):
    status_code, code, type = 403, "forbidden", "permission_error"
    default_message = "Not allowed."


class ApiAccessLocked(AppError):
    status_code, code, type = 403, "api_access_locked", "permission_error"
    default_message = "API access is locked. Buy a pack that unlocks the API."


class InsufficientCredits(AppError):
    status_code, code, type = 402, "insufficient_credits", "insufficient_credits"
    default_message = "No credits remaining. Please purchase more credits."


class NotFound(AppError):
    status_code, code, type = 404, "not_found", "not_found_error"
    default_message = "Not found."


class Conflict(AppError):
    status_code, code, type = 409, "conflict", "conflict_error"
    default_message = "Conflict."


class UpstreamError(AppError):
    status_code, code, type = 502, "upstream_error", "api_error"
    default_message = "The upstream AI provider failed."


class UpstreamTimeout(AppError):
    status_code, code, type = 504, "upstream_timeout", "api_error"
    default_message = "The upstream AI provider timed out."


class ServiceUnavailable(AppError):
    status_code, code, type = 503, "service_unavailable", "api_error"
    default_message = "A dependency is unavailable; try again shortly."


_STATUS_CODES: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "unauthorized"),
    402: ("insufficient_credits", "insufficient_credits"),
    403: ("permission_error", "forbidden"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("conflict_error", "conflict"),
    413: ("invalid_request_error", "payload_too_large"),
    422: ("invalid_request_error", "invalid_request"),
    502: ("api_error", "upstream_error"),
    504: ("api_error", "upstream_timeout"),
}


def error_body(type_: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "code": code, "message": message}}


def error_response(
    status: int, code: str | None = None, message: str = "", headers: dict[str, str] | None = None
) -> JsonResponse:
    type_, default_code = _STATUS_CODES.get(status, ("api_error", "internal_error"))
    return JsonResponse(error_body(type_, code or default_code, message), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body",))
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "Invalid request."


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JsonResponse:
        return JsonResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JsonResponse:
        return error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JsonResponse:
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        if exc.status_code == 404 and message == "Not Found":
            message = "No such route."
        return error_response(exc.status_code, None, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JsonResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "Internal server error.")
