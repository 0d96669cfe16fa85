"""The OpenAI-compatible endpoints (docs/api.md, Proxy): authenticate (cached), hold the price, forward the
bytes, answer with upstream's bytes, settle the hold after the answer is out."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shared.errors import ApiAccessLocked, AppError, InvalidRequest, UpstreamError
from shared.logs import note_request
from shared.web import TemplateRoute

from .callers import CallerKind
from .httpclient import StreamingCall, TransportError
from .metering import Hold, credit_headers
from .metrics import UPSTREAM_ERRORS
from .runtime import Proxy
from .upstream import loads_object

log = logging.getLogger("proxy.api")

_JSON_CT = "application/json"


def _proxy(request: Request) -> Proxy:
    proxy: Proxy = request.app.state.proxy
    return proxy


def _error(exc: AppError, charged: int, remaining: int | None, threshold: int) -> Response:
    headers = credit_headers(charged, remaining, threshold)
    if exc.headers:
        headers.update(exc.headers)
    return Response(
        orjson.dumps(exc.body()), status_code=exc.status_code, headers=headers, media_type=_JSON_CT
    )


async def list_models(request: Request) -> Response:
    proxy = _proxy(request)
    caller = await proxy.auth.for_api(request.headers.get("authorization"), request.headers.get("x-user-id"))
    if caller.kind is CallerKind.INTERNAL:
        # A trusted backend may name a user credits has not seen yet; as on the metered endpoints, the
        # account is created (signup credits once) so the answer can carry the balance headers.
        try:
            await proxy.credits.ensure_user(caller.user_id)
        except AppError:
            pass  # credits unreachable: answer without the balance rather than fail a free call
    balance = await proxy.meter.balance(caller.user_id)
    threshold = proxy.meter.threshold
    if caller.kind is CallerKind.API_KEY and not caller.api_access_unlocked:
        return _error(ApiAccessLocked(await proxy.billing.unlock_hint()), 0, balance, threshold)
    try:
        upstream = await proxy.upstream.call("models", None)
    except AppError as exc:
        return _error(exc, 0, balance, threshold)
    return Response(upstream.body, media_type=_JSON_CT, headers=credit_headers(0, balance, threshold))


async def chat_completions(request: Request) -> Response:
    return await _metered(request, "chat.completions")


async def embeddings(request: Request) -> Response:
    return await _metered(request, "embeddings")


async def images_generations(request: Request) -> Response:
    return await _metered(request, "images.generations")


async def _metered(request: Request, operation: str) -> Response:
    proxy = _proxy(request)
    headers = request.headers
    threshold = proxy.meter.threshold
    caller = await proxy.auth.for_api(headers.get("authorization"), headers.get("x-user-id"))
    # From here on the caller is known: every answer carries the credit headers.
    try:
        if caller.kind is CallerKind.API_KEY and not caller.api_access_unlocked:
            raise ApiAccessLocked(await proxy.billing.unlock_hint())
        raw = await request.body()
        body = loads_object(raw)
        if body is None:
            raise InvalidRequest("The request body must be a JSON object.")
        model = body.get("model")
        note_request(operation=operation, model=model if isinstance(model, str) else "")  # logs, metrics
        quote = proxy.pricing.quote(operation, body, raw)
        hold = await proxy.meter.hold(
            caller.user_id, quote, create_missing_user=caller.kind is CallerKind.INTERNAL
        )
    except AppError as exc:
        return _error(exc, 0, await proxy.meter.balance(caller.user_id), threshold)
    try:
        forward = hold.quote.forward()
    except TypeError:  # orjson.JSONEncodeError: a body nested deeper than orjson writes (254 levels)
        refused = InvalidRequest("The request body is nested too deeply.")
        return _error(refused, 0, await proxy.meter.release_now(hold), threshold)
    if hold.quote.stream:
        return await _stream(proxy, hold, forward)
    # Once forwarded, the request is charged even if its client leaves (docs/api.md, Proxy); the upstream
    # call is then cancelled, so the operator stops paying for it (see client_watch.ClientWatch).
    task = asyncio.current_task()
    assert task is not None
    watch = proxy.client_watch
    watch.add(task, request)
    try:
        upstream = await proxy.upstream.call(operation, forward)
    except AppError as exc:
        watch.discard(task)
        return _error(exc, 0, await proxy.meter.release_now(hold), threshold)
    except asyncio.CancelledError:
        if not watch.discard(task):
            await proxy.meter.release_now(hold)
            raise
        task.uncancel()
        UPSTREAM_ERRORS.labels(operation, "client_gone").inc()
        # What the cancelled call cost upstream is unknown: the hold, the most the caller agreed to.
        proxy.meter.settle_later(hold, hold.quote.charge(None))
        return Response(status_code=499)
    except BaseException:
        watch.discard(task)
        await proxy.meter.release_now(hold)
        raise
    watch.discard(task)
    parsed = loads_object(upstream.body)
    charge = hold.quote.charge(parsed.get("usage") if parsed else None)
    proxy.meter.settle_later(hold, charge)
    content_type = upstream.header(b"content-type")
    return Response(
        upstream.body,
        headers=credit_headers(charge.credits, hold.remaining_after(charge.credits), threshold),
        media_type=content_type.decode("latin-1") if content_type else _JSON_CT,
    )


async def _stream(proxy: Proxy, hold: Hold, raw: bytes) -> Response:
    threshold = proxy.meter.threshold
    try:
        call = await proxy.upstream.open_stream(hold.operation, raw)
    except AppError as exc:
        return _error(exc, 0, await proxy.meter.release_now(hold), threshold)
    except BaseException:
        await proxy.meter.release_now(hold)
        raise
    return SseRelay(proxy, hold, call)


class SseRelay(Response):
    """Forwards upstream's server-sent events as they arrive, counting what the client was served.

    Output is counted per content-bearing event (OpenAI streams about one token per event) and,
    when upstream sends it, replaced by the exact `usage`. Whatever ends the stream (completion, an
    upstream drop or stall, the client going away or stalling, cancellation), the hold settles at the
    cost of what was forwarded: the full price for a per-request model. Only an upstream that fails
    before any output makes it free. A client that leaves, or stops reading for longer than
    `CLIENT_STALL_SECONDS`, is cut off and the upstream call closed. The relay owns the opened call:
    it closes it when the stream ends, however it ends.
    """

    def __init__(self, proxy: Proxy, hold: Hold, call: StreamingCall) -> None:
        self.proxy = proxy
        self.hold = hold
        self.call = call
        self.client_wants_usage = hold.quote.client_wants_usage
        self.stall_seconds = proxy.settings.client_stall_seconds
        self.status_code = 200
        self.background = None
        charged_header = hold.amount
        self.init_headers(
            {
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
                **credit_headers(charged_header, hold.reservation.credits_remaining, proxy.meter.threshold),
            }
        )
        self.output_events = 0
        self.usage: Any = None
        self.completed = False

    def _scan(self, event: bytes) -> bool:
        """Inspects one event; False when it must not be forwarded (the usage chunk nobody asked for)."""
        if not event.startswith(b"data:"):
            return True
        payload = event[5:].strip()
        if payload == b"[DONE]":
            self.completed = True
            return True
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(chunk, dict):
            return True
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if isinstance(usage, dict):
            self.usage = usage
            if not choices and not self.client_wants_usage:
                return False
        if isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and (
                    delta.get("content") or delta.get("tool_calls") or delta.get("refusal")
                ):
                    self.output_events += 1
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.current_task()
        assert pump is not None
        client_gone = False

        async def watch() -> None:
            nonlocal client_gone
            while (await receive())["type"] != "http.disconnect":
                pass
            client_gone = True
            pump.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        upstream_failed = False
        idle_timeout = self.proxy.upstream.timeout
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            pending = b""
            chunks = self.call.iter_bytes()
            while True:
                try:
                    async with asyncio.timeout(idle_timeout):
                        data = await anext(chunks)
                except StopAsyncIteration:
                    break
                pending += data
                if b"\n\n" not in pending:
                    continue
                *events, pending = pending.split(b"\n\n")
                out = [e + b"\n\n" for e in events if e and self._scan(e)]
                if out:
                    try:
                        async with asyncio.timeout(self.stall_seconds):
                            await send(
                                {"type": "http.response.body", "body": b"".join(out), "more_body": True}
                            )
                    except TimeoutError:
                        # The client stopped reading (TCP back-pressure): cut it off.
                        UPSTREAM_ERRORS.labels(self.hold.operation, "client_stalled").inc()
                        client_gone = True
                        break
            if not self.completed and not client_gone:
                upstream_failed = True
        except (TransportError, TimeoutError) as exc:
            upstream_failed = True
            kind = "stalled" if isinstance(exc, TimeoutError) else "dropped"
            UPSTREAM_ERRORS.labels(self.hold.operation, kind).inc()
        except asyncio.CancelledError:
            if not client_gone:
                raise
            pump.uncancel()
        finally:
            watcher.cancel()
            self.call.close()
            # Charged once forwarded, unless the upstream failed before any output.
            served = client_gone or self.output_events > 0 or (self.completed and not upstream_failed)
            charge = self.hold.quote.charge(self.usage, self.output_events) if served else None
            self.proxy.meter.settle_later(self.hold, charge)
        if upstream_failed and not client_gone:
            error = UpstreamError("The upstream AI provider ended the stream early.")
            # OpenAI's own way to fail a stream that has begun; the SDKs raise it as an APIError.
            event = b"data: " + orjson.dumps(error.body()) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if not client_gone:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# Plain Starlette routes: FastAPI's per-request dependency and body machinery showed in the
# profile for endpoints that only read headers and raw bytes.
hot_routes = [
    TemplateRoute("/v1/models", list_models, methods=["GET"]),
    TemplateRoute("/v1/chat/completions", chat_completions, methods=["POST"]),
    TemplateRoute("/v1/embeddings", embeddings, methods=["POST"]),
    TemplateRoute("/v1/images/generations", images_generations, methods=["POST"]),
]

__all__ = ["hot_routes"]
