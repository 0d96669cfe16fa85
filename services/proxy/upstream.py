"""The upstream AI provider (any OpenAI-compatible API at `OPENAI_BASE_URL`), over one long-lived
keep-alive pool. Request bodies go out and response bodies come back as bytes: nothing is re-serialised,
so OpenAI's exact shapes (null fields included) reach the client unchanged."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from shared.errors import AppError, UpstreamError, UpstreamTimeout

from .httpclient import HttpPool, Response, StreamingCall, TransportError
from .metrics import UPSTREAM_ERRORS, UPSTREAM_LATENCY

PATHS = {
    "models": b"/models",
    "chat.completions": b"/chat/completions",
    "embeddings": b"/embeddings",
    "images.generations": b"/images/generations",
}
_JSON = (b"content-type", b"application/json")


class UpstreamRejected(AppError):
    """Upstream answered 4xx: the client gets the same status and upstream's message."""

    def __init__(self, status: int, message: str, type_: str, code: str) -> None:
        self.status_code = status
        self.type = type_
        self.code = code
        super().__init__(message)


_DEFAULT_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request",
    429: "rate_limit_exceeded",
}


def rejection(status: int, body: bytes) -> UpstreamRejected:
    message, type_, code = (
        f"The upstream AI provider rejected the request ({status}).",
        "invalid_request_error",
        None,
    )
    try:
        error = orjson.loads(body).get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            type_ = str(error.get("type") or type_)
            code = error.get("code")
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return UpstreamRejected(
        status,
        message,
        type_,
        str(code) if isinstance(code, str) and code else _DEFAULT_CODES.get(status, "invalid_request"),
    )


class Upstream:
    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_connections: int) -> None:
        headers = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else []
        self.pool = HttpPool(base_url, max_connections=max_connections, default_headers=headers)
        self.timeout = timeout
        self._latency = {op: UPSTREAM_LATENCY.labels(op) for op in PATHS}

    async def call(self, operation: str, body: bytes | None) -> Response:
        """The whole call within the timeout. 2xx is returned; 4xx raises UpstreamRejected; 5xx,
        an unreachable upstream or a broken answer raise UpstreamError; the timeout UpstreamTimeout."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                if body is None:
                    response = await self.pool.request(b"GET", PATHS[operation])
                else:
                    response = await self.pool.request(b"POST", PATHS[operation], headers=(_JSON,), body=body)
        except (TimeoutError, TransportError) as exc:
            raise self._unreachable(operation, exc) from None
        self._latency[operation].observe(time.perf_counter() - started)
        status = response.status
        if status < 300:
            return response
        raise self._error(operation, status, response.body)

    async def open_stream(self, operation: str, body: bytes) -> StreamingCall:
        """Starts a streamed call and waits (within the timeout) for its head. Errors are raised as in
        `call`, the call closed; the call returned is the caller's to read and to `close()`."""
        started = time.perf_counter()
        call = self.pool.stream(b"POST", PATHS[operation], headers=(_JSON,), body=body)
        try:  # closed here whatever fails before it is handed over
            try:
                async with asyncio.timeout(self.timeout):
                    await call.open()
                    error_body = await call.read() if call.status >= 300 else b""
            except (TimeoutError, TransportError) as exc:
                raise self._unreachable(operation, exc) from None
            self._latency[operation].observe(time.perf_counter() - started)
            if call.status >= 300:
                raise self._error(operation, call.status, error_body)
        except BaseException:
            call.close()
            raise
        return call

    @staticmethod
    def _unreachable(operation: str, exc: TimeoutError | TransportError) -> AppError:
        """No answer within the timeout (504), or none at all (502), as docs/api.md (Proxy) says."""
        if isinstance(exc, TimeoutError):
            UPSTREAM_ERRORS.labels(operation, "timeout").inc()
            return UpstreamTimeout()
        UPSTREAM_ERRORS.labels(operation, "unreachable").inc()
        return UpstreamError(f"The upstream AI provider is unreachable: {exc}")

    @staticmethod
    def _error(operation: str, status: int, body: bytes) -> AppError:
        """An upstream error answer: 4xx passed on with upstream's message, anything else a 502."""
        UPSTREAM_ERRORS.labels(operation, str(status)).inc()
        if 400 <= status < 500:
            return rejection(status, body)
        return UpstreamError(f"The upstream AI provider failed (HTTP {status}).")

    async def aclose(self) -> None:
        await self.pool.aclose()


def loads_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None
