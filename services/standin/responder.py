"""What every API endpoint of the stand-in shares: authentication, request ids, answers, and the
knobs' effects before and during an answer (latency, hang, injected failure, dropped body)."""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass
from typing import Any

from .asgi import JSON, Receive, Scope, Send, disconnected
from .config import StandinConfig
from .errors import ClientGone, RequestError, drop_connection, injected_failure
from .knobs import NO_OVERRIDES, Knobs, Overrides, parse_model, resolve
from .stats import Stats


@dataclass(slots=True)
class Call:
    """One routed API request, as its endpoint handler gets it."""

    scope: Scope
    receive: Receive
    send: Send
    body: dict[str, Any]
    overrides: Overrides  # from the request's X-Standin-* headers
    api_key: str | None
    endpoint: str


class Responder:
    def __init__(self, config: StandinConfig, stats: Stats) -> None:
        self.config = config
        self.stats = stats
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(4).hex()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = asyncio.Event()

    def started(self) -> None:
        self._loop = asyncio.get_running_loop()

    def release_held(self) -> None:
        """Let held ("timeout"/"stall") requests end now; callable from any thread.

        A stopping server waits for in-flight requests, and a held one would otherwise only end
        when the server gives up and cancels it.
        """
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._closing.set)

    async def hold(self, client_left: asyncio.Future[None]) -> bool:
        """Wait until the client leaves (True), or the hang time ends or the server stops (False)."""
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            done, _ = await asyncio.wait(
                (client_left, closing), timeout=self.config.hang_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            return client_left in done
        finally:
            closing.cancel()
            client_left.cancel()

    def next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    def authenticate(self, authorization: bytes) -> str | None:
        scheme, _, key = authorization.decode("latin-1").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            if not self.config.require_auth:
                return None
            raise RequestError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if self.config.api_key is not None and key != self.config.api_key:
            raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    async def respond(self, send: Send, status: int, body: bytes) -> None:
        self.stats.by_status[status] += 1
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    JSON,
                    (b"content-length", b"%d" % len(body)),
                    (b"x-request-id", f"req_{self.next_id()}".encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def admit(self, call: Call, model: str | None, stream: bool = False) -> Knobs | None:
        """Record a valid request and apply latency, hang and injected failures.

        Returns the request's knobs, or None when its answer has been given here.
        """
        knobs = resolve(
            self.config, parse_model(model) if model is not None else NO_OVERRIDES, call.overrides
        )
        # Only the model list has no model, and as a GET it has no body to record.
        self.stats.record(
            call.endpoint, model, stream, call.api_key, call.body if model is not None else None
        )
        if knobs.latency_s > 0:
            # Watched, so a test can see that a gateway cancelled the call when its client left.
            watcher = asyncio.ensure_future(disconnected(call.receive))
            done, _ = await asyncio.wait((watcher,), timeout=knobs.latency_s)
            watcher.cancel()
            if done:
                self.stats.cancelled += 1
                raise ClientGone
        if knobs.timeout:
            if await self.hold(asyncio.ensure_future(disconnected(call.receive))):
                self.stats.cancelled += 1
            else:
                error = RequestError(
                    504,
                    "The stand-in held this request until its hang time ran out or it shut down.",
                    "server_error",
                )
                await self.respond(call.send, 504, error.body)
            return None
        if knobs.fail_status is not None:
            await self.respond(call.send, knobs.fail_status, injected_failure(knobs.fail_status).body)
            return None
        return knobs

    async def answer(self, send: Send, body: bytes, knobs: Knobs) -> None:
        """Answer 200 with ``body``, or with half of it and a cut connection when the knobs drop."""
        if knobs.drop_after is None:
            await self.respond(send, 200, body)
            return
        # Announce the full length, then stop halfway: the client must see a truncated body.
        self.stats.by_status[200] += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [JSON, (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        raise drop_connection()
