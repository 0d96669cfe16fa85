"""OpenAI's error answers, the checks on request parameters that raise them, and the exceptions
that end a request before its answer is complete."""

from __future__ import annotations

import logging
from typing import Any

import orjson

# Injected failures (``standin-fail-<status>``) answer with what OpenAI says for that status.
_FAILURES: dict[int, tuple[str, str, str | None]] = {
    400: ("The stand-in was asked to reject this request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}
_SERVER_ERROR = (
    "The server had an error while processing your request. Sorry about that!",
    "server_error",
    None,
)
_CLIENT_ERROR = ("The stand-in was asked to fail this request.", "invalid_request_error", None)


class RequestError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def injected_failure(status: int) -> RequestError:
    message, type_, code = _FAILURES.get(status) or (_SERVER_ERROR if status >= 500 else _CLIENT_ERROR)
    return RequestError(status, message, type_, None, code)


def missing(param: str) -> RequestError:
    return RequestError(
        400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def invalid(param: str, message: str) -> RequestError:
    return RequestError(400, message, param=param, code="invalid_value")


def required_model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise missing("model")
    return model


def optional_int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid(name, f"Invalid '{name}': expected an integer {bound}.")
    return value


class ClientGone(Exception):
    pass


class DroppedConnection(Exception):
    """Raised mid-response so the server closes the socket without finishing the body."""


class _HideDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        return not (exc and exc[0] is not None and issubclass(exc[0], DroppedConnection))


_drop_filter_installed = False


def drop_connection() -> DroppedConnection:
    """The exception to raise to cut the connection now."""
    # A deliberate drop is not an application error; keep it out of uvicorn's error log.
    global _drop_filter_installed
    if not _drop_filter_installed:
        logging.getLogger("uvicorn.error").addFilter(_HideDrops())
        _drop_filter_installed = True
    return DroppedConnection()
