"""Limits on what a client may make a service read: header size, header and body read time, body size.

uvicorn's httptools protocol (the one we run, for speed) has none of them: a request's line and
headers may grow without bound in memory, a connection that never finishes its headers (slowloris)
or its body stays open forever, a fresh connection may stay silent forever, and once a response is
sent on a kept-alive connection the rest of an unread request body is read to its end however
large. `LimitedHttpToolsProtocol` is that protocol with the limits added; `serve()` runs it.

- Request line and headers over `max_header_bytes`: 431 in the error envelope, connection closed.
- Headers not complete `header_timeout` seconds after the connection opened or the request's first
  byte: 408 (when no response was started) and the connection closed; likewise a body not complete
  `body_timeout` seconds after its headers.
- A request the parser refuses (e.g. a NUL character in a header value): 400 in the error envelope.
- Body bytes past MAX_BODY_BYTES: the app answers 413 (`shared.web.BodyLimitMiddleware`). Once a
  request is answered (that 413, or any answer given before its body was read), at most
  `LINGER_BYTES` more of its body are read and dropped, then the connection is closed: enough for
  a client that sends its whole body before reading to see the answer (closing a socket with unread
  data resets it, and the answer is lost), never the rest of a body however large.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# What is read and dropped of a request's body after its answer (see the module docstring).
LINGER_BYTES = 1024 * 1024


def _error_response(status: int, reason: str, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"type": "invalid_request_error", "code": code, "message": message}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded header size and read times (see the module)."""

    max_header_bytes: ClassVar[int] = 64 * 1024
    header_timeout: ClassVar[float] = 10.0
    body_timeout: ClassVar[float] = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Between the first byte of a request and the end of its headers.
        self._in_headers = False
        self._began_here = False
        self._header_bytes = 0
        self._dropped_bytes = 0
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def configured(
        cls, *, max_header_bytes: int, header_timeout: float, body_timeout: float
    ) -> type[LimitedHttpToolsProtocol]:
        """A subclass with these limits, to pass to uvicorn as its `http` protocol class."""
        return type(
            "LimitedHttpToolsProtocol",
            (cls,),
            {
                "max_header_bytes": max_header_bytes,
                "header_timeout": header_timeout,
                "body_timeout": body_timeout,
            },
        )

    # -- read deadline --------------------------------------------------------------------------
    # Every request moves the deadline twice; a timer per move would be two timer handles per
    # request on the hot path. One timer per connection instead, renewed only when it fires early.

    def _arm(self, seconds: float) -> None:
        self._deadline = self.loop.time() + seconds
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)

    def _disarm(self) -> None:
        self._deadline = None  # a pending timer finds nothing to do

    def _check_deadline(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._check_deadline)
            return
        self._deadline = None
        self._read_timed_out()

    def _read_timed_out(self) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
            if self.cycle is not None and not self.cycle.response_complete:
                # The app waits for the rest of the body: it sees a disconnect, and sends nothing more.
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.write(
                _error_response(
                    408, "Request Timeout", "request_timeout", "The request was not sent in time."
                )
            )
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # What the parser refuses (a NUL or other control character in a header, a malformed
        # request line) is answered in the error envelope too, not uvicorn's plain text.
        self._disarm()
        self.transport.write(_error_response(400, "Bad Request", "invalid_request", msg))
        self.transport.close()

    # -- connection and parser callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A fresh connection gets as long for its first request's headers as any request does.
        self._arm(self.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._began_here = False
        super().data_received(data)
        if self._in_headers and not self._began_here and not self.transport.is_closing():
            # Counted after parsing, while a request's headers are still unfinished: the parser
            # holds them in memory, so this bounds them at the limit plus two reads. The read in
            # which the request began is not counted: it may as well hold the end of the previous
            # (pipelined) request's body, which is no header.
            self._header_bytes += len(data)
            if self._header_bytes > self.max_header_bytes:
                self._disarm()
                self.transport.write(
                    _error_response(
                        431,
                        "Request Header Fields Too Large",
                        "headers_too_large",
                        f"The request line and headers exceed {self.max_header_bytes} bytes.",
                    )
                )
                self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._began_here = True
        self._header_bytes = 0
        self._dropped_bytes = 0
        self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._arm(self.body_timeout)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if self.cycle.response_complete:
            # Answered already (the 413, or any early answer): uvicorn would read the rest to its
            # end to find the next request; past a little, it is not worth it.
            self._dropped_bytes += len(body)
            if self._dropped_bytes > LINGER_BYTES:
                self._disarm()
                self.transport.close()
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
