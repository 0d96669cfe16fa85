"""What every service's HTTP app has in common: middleware, probes, metrics, the error envelope."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.apidocs import install_docs
from shared.errors import error_response, install_error_handlers
from shared.logs import REQUEST_ID_HEADER, new_request_id, request_id_var, request_notes_var
from shared.metrics import CREDITS_BY_MODEL, HTTP_LATENCY, REQUESTS_BY_MODEL, model_label, render_latest
from shared.responses import JsonResponse
from shared.routing import TemplateMount as TemplateMount  # re-exported: routes import it from here
from shared.routing import TemplateRoute as TemplateRoute

ReadinessCheck = Callable[[], Awaitable[Any]]
access_log = logging.getLogger("access")

_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_CHARGED_HEADER = b"x-credits-charged"
# The portal marks its periodic balance refresh; those lines are logged at DEBUG.
_POLL_HEADER = b"x-poll"


class RequestContextMiddleware:
    """Request id (taken from the caller or minted), latency histogram per route, one access log line.

    Runs on every request of every service, so it keeps per-request work small: the histogram child
    of each (method, route, status) is resolved once and cached (prometheus_client's `labels()` is a
    lock plus a dict lookup and tuple building per call), and the access line is only built when the
    access logger is enabled for INFO.
    """

    def __init__(self, app: ASGIApp, service: str, public_base_url: str = "") -> None:
        self.app = app
        self.service = service
        self._public_base = public_base_url.rstrip("/").encode()
        self._rid_header = REQUEST_ID_HEADER.encode()
        self._observers: dict[tuple[str, str, int], Callable[[float], None]] = {}

    def _observer(self, method: str, route: str, status: int) -> Callable[[float], None]:
        key = (method, route, status)
        observe = self._observers.get(key)
        if observe is None:
            # Label values are bounded (route templates, 'unmatched', real status codes), so is this.
            observe = HTTP_LATENCY.labels(self.service, method, route, str(status)).observe
            self._observers[key] = observe
        return observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid_header = self._rid_header
        rid = None
        poll = False
        for name, value in scope["headers"]:
            if name == rid_header:
                rid = value.decode("latin-1")[:128]
            elif name == _POLL_HEADER:
                poll = True
        rid = rid or new_request_id()
        token = request_id_var.set(rid)
        notes: dict[str, str] = {}
        notes_token = request_notes_var.set(notes)
        started = time.perf_counter()
        status = 500
        charged = "-"
        rid_pair = (rid_header, rid.encode())

        async def send_wrapper(message: Message) -> None:
            nonlocal status, charged
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == _CHARGED_HEADER:
                        charged = value.decode("latin-1")
                headers = [*message.get("headers", ()), rid_pair]
                if 300 <= status < 400:
                    headers = self._rebased_location(headers, scope)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            # Only a route template may be a label value: a response given before routing (404,
            # trailing-slash redirect, 413 on the declared length) must not mint a series per URL.
            path = getattr(route, "path", None) or "unmatched"
            self._observer(scope["method"], path, status)(elapsed)
            operation = notes.get("operation")
            if operation is not None:
                model = model_label(notes.get("model", ""))
                REQUESTS_BY_MODEL.labels(self.service, operation, model, str(status)).inc()
                if charged.isdigit() and charged != "0":
                    CREDITS_BY_MODEL.labels(self.service, operation, model).inc(int(charged))
            level = logging.DEBUG if poll else logging.INFO
            if access_log.isEnabledFor(level) and scope["path"] not in _PROBE_PATHS:
                user = notes.get("user", "-")
                duration_ms = round(elapsed * 1000, 3)
                # One readable line (make run prints plain text) that also carries its fields (JSON logs).
                access_log.log(
                    level,
                    "%s %s %s user=%s credits=%s %.1f ms rid=%s",
                    scope["method"],
                    scope["path"],
                    status,
                    user,
                    charged,
                    duration_ms,
                    rid,
                    extra={
                        "fields": {
                            "status": status,
                            "duration_ms": duration_ms,
                            "route": path,
                            "user_id": user,
                            "credits_charged": charged,
                        }
                    },
                )
            request_notes_var.reset(notes_token)
            request_id_var.reset(token)

    def _rebased_location(
        self, headers: list[tuple[bytes, bytes]], scope: Scope
    ) -> list[tuple[bytes, bytes]]:
        """A redirect Starlette built from the request's own URL (the trailing-slash redirect) names
        the `Host` the client sent, which anyone can set: it is rebased on PUBLIC_BASE_URL, or made
        a path without a host where a service has none (docs/configuration.md)."""
        host = next((value for name, value in scope["headers"] if name == b"host"), None)
        if host is None:
            return headers
        rebased = []
        for name, value in headers:
            if name == b"location":
                for scheme in (b"http://", b"https://"):
                    origin = scheme + host
                    rest = value[len(origin) :]
                    if value.startswith(origin) and (not rest or rest[:1] in b"/?#"):
                        value = self._public_base + (rest if rest[:1] == b"/" else b"/" + rest)
                        break
            rebased.append((name, value))
        return rebased


class ServiceApp(FastAPI):
    """FastAPI with a short way in for the few routes every metered request goes through.

    A request that fully matches a hot route (a plain `TemplateRoute`) skips the stack FastAPI and
    Starlette put around the router (server-error, telemetry, body-limit, exception and exit-stack
    middleware, then a scan of every route), which profiles of the proxy and of credits showed as a
    large share of their CPU per request. It still runs through this app's own middleware (request
    id, latency metric, access log, body limit: `user_middleware`, built the same way), and its
    errors get this app's exception handlers, so answers are the same either way. Anything else,
    including a hot path with another method (405), goes through FastAPI as usual. A hot endpoint is
    an async function of the request that returns its response; errors it raises are answered by
    the handlers, while an error inside a response that is already being sent ends the connection.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hot_routes: list[Route] = []
        self._hot_stack: ASGIApp | None = None

    def add_hot_routes(self, routes: Iterable[Route]) -> None:
        routes = list(routes)
        for route in routes:
            if not (isinstance(route, TemplateRoute) and inspect.iscoroutinefunction(route.endpoint)):
                raise TypeError(f"hot route {route.path}: needs a TemplateRoute with an async endpoint")
        self._hot_routes += routes
        # Also first in the router: what the short way does not take (a HEAD, a wrong method) is
        # answered by FastAPI as for any route.
        self.router.routes[0:0] = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self._hot_routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope["app"] = self
                    scope["router"] = self.router
                    scope.update(child)
                    if self._hot_stack is None:
                        # Built with FastAPI's own stack, so that adding middleware later fails
                        # loudly (as Starlette makes it) instead of missing the hot routes.
                        if self.middleware_stack is None:
                            self.middleware_stack = self.build_middleware_stack()
                        self._hot_stack = self._build_hot_stack()
                    await self._hot_stack(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)

    def _build_hot_stack(self) -> ASGIApp:
        app: ASGIApp = self._serve_hot
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app

    async def _serve_hot(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await scope["endpoint"](request)
        except Exception as exc:
            response = await self._handled(request, exc)
        await response(scope, receive, send)

    async def _handled(self, request: Request, exc: Exception) -> Response:
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                response = handler(request, exc)
                return await response if inspect.isawaitable(response) else response
        raise exc


class BodyLimitMiddleware:
    """Refuses what no route may see: bodies over the limit with 413 without reading past it
    (docs/configuration.md MAX_BODY_BYTES), and a NUL character in the path or query (`%00`), which would
    reach PostgreSQL as a path parameter or query value and fail there, with 400."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if "\x00" in scope["path"] or b"%00" in scope["query_string"]:
            response = error_response(
                400, "invalid_request", "The URL must not contain NUL characters (%00)."
            )
            await response(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    response = error_response(
                        413, "payload_too_large", f"Request body exceeds {self.max_bytes} bytes."
                    )
                    response.headers["connection"] = "close"
                    await response(scope, receive, send)
                    return
                break
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside body parsing, so the app's handlers answer with the 413 envelope.
                    # What the client still sends after it is read only briefly (shared.http_limits).
                    raise StarletteHTTPException(413, f"Request body exceeds {self.max_bytes} bytes.")
            return message

        await self.app(scope, limited_receive, send)


def create_service_app(
    service: str,
    *,
    max_body_bytes: int,
    public_base_url: str = "",
    lifespan: Any = None,
    title: str | None = None,
    telemetry: TelemetryConfig | None = None,
) -> ServiceApp:
    """A FastAPI app with the shared middleware, error envelope and probe routes.

    The service registers its readiness checks in `app.state.readiness_checks` (name → async callable
    that raises when the dependency does not work) during its lifespan. `telemetry` is passed to
    FastAPI (e.g. `{"tracing": False, "metrics": False, "logs": False}` skips its per-request
    OpenTelemetry checks on a hot path; metrics come from Prometheus here). `public_base_url` is
    the base of redirects built from the request's URL (none: a path without a host).
    """
    app = ServiceApp(
        title=title or f"credit-proxy {service}",
        lifespan=lifespan,
        default_response_class=JsonResponse,
        docs_url=None,  # shared/apidocs.py serves /docs from vendored files
        redoc_url=None,
        telemetry=telemetry,
    )
    app.state.readiness_checks = {}
    install_docs(app)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(RequestContextMiddleware, service=service, public_base_url=public_base_url)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JsonResponse:
        checks: dict[str, ReadinessCheck] = app.state.readiness_checks
        results: dict[str, str] = {}

        async def run(name: str, check: ReadinessCheck) -> None:
            try:
                await asyncio.wait_for(check(), timeout=2.0)
                results[name] = "ok"
            except Exception as exc:
                results[name] = f"failing: {type(exc).__name__}"

        await asyncio.gather(*(run(n, c) for n, c in checks.items()))
        ready = all(v == "ok" for v in results.values())
        return JsonResponse(
            {"status": "ready" if ready else "not_ready", "checks": results},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = render_latest()
        return Response(body, media_type=content_type)

    return app
