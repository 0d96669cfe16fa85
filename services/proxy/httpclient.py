"""A lean HTTP/1.1 client for the hot path: keep-alive connection pools on asyncio protocols, httptools
for parsing, bodies kept as bytes.

The proxy's added latency is dominated by its two outgoing calls per request (reserve at credits,
then the upstream call). General-purpose clients (httpx, the openai SDK on top of it) spend several
hundred microseconds per call in Python; this one does the least a keep-alive HTTP/1.1 exchange needs:
write one buffer, parse the answer with a C parser, hand the body over as bytes or as chunks while
they arrive. Timeouts are the caller's (`asyncio.timeout` around a call); a call that is cancelled
or fails mid-way closes its connection instead of returning it to the pool.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson

Headers = list[tuple[bytes, bytes]]

# Pause reading from the socket when this much streamed body is waiting for the consumer.
_HIGH_WATER = 256 * 1024


class TransportError(Exception):
    """The exchange failed below HTTP: could not connect, connection lost, malformed response."""


class ConnectFailed(TransportError):
    pass


class ConnectionLost(TransportError):
    pass


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass(slots=True)
class _Exchange:
    """One response as it is parsed."""

    streaming: bool
    status: int = 0
    headers: Headers = field(default_factory=list)
    chunks: collections.deque[bytes] = field(default_factory=collections.deque)
    buffered: int = 0
    complete: bool = False
    got_bytes: bool = False
    error: BaseException | None = None
    keep_alive: bool = False
    headers_ready: asyncio.Future[None] | None = None
    waiter: asyncio.Future[None] | None = None


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self._parser = httptools.HttpResponseParser(self)
        self._exchange: _Exchange | None = None
        self._paused = False
        self._header_name = b""

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        exchange = self._exchange
        if exchange is None:
            # Bytes nobody asked for: the connection cannot be trusted any more.
            self.close()
            return
        exchange.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionLost(f"malformed response: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self._exchange
        if exchange is not None and not exchange.complete:
            # A response without a length ends at EOF; httptools completes it on feed_eof.
            try:
                self._parser.feed_data(b"")
            except httptools.HttpParserError:
                pass
            if not exchange.complete:
                self._fail(ConnectionLost(str(exc) if exc else "connection closed by the server"))

    # --- httptools callbacks ---

    def on_status(self, status: bytes) -> None:
        pass

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._exchange is not None
        self._exchange.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        exchange.status = self._parser.get_status_code()
        if exchange.headers_ready is not None and not exchange.headers_ready.done():
            exchange.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        exchange.chunks.append(body)
        if exchange.streaming:
            exchange.buffered += len(body)
            self._wake(exchange)
            if exchange.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        exchange = self._exchange
        assert exchange is not None
        exchange.complete = True
        exchange.keep_alive = self._parser.should_keep_alive()
        self._wake(exchange)

    # --- helpers ---

    def _wake(self, exchange: _Exchange) -> None:
        waiter = exchange.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        exchange = self._exchange
        if exchange is None:
            return
        exchange.error = exc
        if exchange.headers_ready is not None and not exchange.headers_ready.done():
            exchange.headers_ready.set_exception(exc)
            exchange.headers_ready.exception()  # consumed here; re-raised to the caller below
        self._wake(exchange)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start(self, request: bytes, streaming: bool) -> _Exchange:
        assert self.transport is not None
        exchange = _Exchange(streaming=streaming)
        exchange.headers_ready = self._loop.create_future()
        self._exchange = exchange
        self._parser = httptools.HttpResponseParser(self)
        self.transport.write(request)
        return exchange

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def finish(self) -> bool:
        """Ends the current exchange; True if the connection may be reused."""
        exchange = self._exchange
        self._exchange = None
        return exchange is not None and exchange.complete and exchange.keep_alive and not self.closed


class HttpPool:
    """Keep-alive connections to one origin (`base_url` may carry a path prefix, e.g. `/v1`)."""

    def __init__(self, base_url: str, *, max_connections: int = 512, default_headers: Headers | None = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported base URL {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._host = parts.hostname
        self._tls = parts.scheme == "https"
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/").encode()
        default_port = 443 if self._tls else 80
        host_header = self._host if self._port == default_port else f"{self._host}:{self._port}"
        self._host_header = host_header.encode()
        self._ssl = ssl.create_default_context() if self._tls else None
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)
        fixed = [(b"host", self._host_header), *(default_headers or [])]
        self._fixed_head = b"".join(k + b": " + v + b"\r\n" for k, v in fixed)
        self._closed = False

    def _head(
        self, method: bytes, path: bytes, headers: Iterable[tuple[bytes, bytes]], body: bytes | None
    ) -> bytes:
        lines = [method, b" ", self._prefix, path, b" HTTP/1.1\r\n", self._fixed_head]
        for key, value in headers:
            lines += (key, b": ", value, b"\r\n")
        if body is not None:
            lines += (b"content-length: ", str(len(body)).encode(), b"\r\n")
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        return b"".join(lines)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await loop.create_connection(
                lambda: _Connection(loop),
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._tls else None,
            )
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        return protocol

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return await self._connect()

    def _release(self, conn: _Connection) -> None:
        if conn.finish() and not self._closed:
            self._idle.append(conn)
        else:
            conn.close()

    async def _start(
        self,
        method: bytes,
        path: bytes,
        headers: Iterable[tuple[bytes, bytes]],
        body: bytes | None,
        streaming: bool,
    ) -> tuple[_Connection, _Exchange]:
        """Sends the request and waits for the response head. A reused connection that the server had
        already closed (no byte of an answer) is retried once on a fresh one."""
        request = self._head(method, path, headers, body)
        for attempt in (0, 1):
            conn = await self._acquire()
            exchange = conn.start(request, streaming)
            assert exchange.headers_ready is not None
            try:
                await exchange.headers_ready
            except ConnectionLost:
                conn.finish()
                conn.close()
                if attempt == 0 and conn.reused and not exchange.got_bytes:
                    continue
                raise
            except BaseException:
                conn.finish()
                conn.close()
                raise
            return conn, exchange
        raise AssertionError("unreachable")

    async def request(
        self,
        method: bytes,
        path: bytes,
        *,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
    ) -> Response:
        async with self._slots:
            conn, exchange = await self._start(method, path, headers, body, streaming=False)
            try:
                while not exchange.complete:
                    if exchange.error is not None:
                        raise exchange.error
                    exchange.waiter = asyncio.get_running_loop().create_future()
                    await exchange.waiter
                    exchange.waiter = None
                if exchange.error is not None and not exchange.complete:
                    raise exchange.error
            except BaseException:
                conn.finish()
                conn.close()
                raise
            self._release(conn)
            chunks = exchange.chunks
            body_bytes = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            return Response(exchange.status, exchange.headers, body_bytes)

    async def json(
        self, method: bytes, path: bytes, payload: Any = None, headers: Iterable[tuple[bytes, bytes]] = ()
    ) -> Response:
        body = None if payload is None else orjson.dumps(payload)
        extra = [(b"content-type", b"application/json"), *headers] if body is not None else list(headers)
        return await self.request(method, path, headers=extra, body=body)

    def stream(
        self,
        method: bytes,
        path: bytes,
        *,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
    ) -> StreamingCall:
        return StreamingCall(self, method, path, list(headers), body)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class StreamingCall:
    """One streamed exchange, owned by whoever opened it: `await call.open()` sends the request and
    waits for the head, `iter_bytes()` hands the body over as it arrives, and `close()` (once, whether
    `open` succeeded or not) gives the slot back and the connection to the pool when it was read to
    the end. The upstream's `open_stream` opens one and hands it to the relay that reads it."""

    def __init__(
        self, pool: HttpPool, method: bytes, path: bytes, headers: Headers, body: bytes | None
    ) -> None:
        self._pool = pool
        self._args = (method, path, headers, body)
        self._conn: _Connection | None = None
        self._exchange: _Exchange | None = None
        self._holds_slot = False
        self.status = 0
        self.headers: Headers = []

    async def open(self) -> None:
        await self._pool._slots.acquire()
        self._holds_slot = True
        self._conn, self._exchange = await self._pool._start(*self._args, streaming=True)
        self.status = self._exchange.status
        self.headers = self._exchange.headers

    def close(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self._pool._slots.release()
        conn, exchange = self._conn, self._exchange
        if conn is None or exchange is None:
            return
        self._conn = self._exchange = None
        if exchange.complete and exchange.error is None and not exchange.chunks:
            self._pool._release(conn)
        else:
            # Not read to the end: the rest would poison the next exchange on this connection.
            conn.finish()
            conn.close()

    async def iter_bytes(self) -> AsyncIterator[bytes]:
        conn, exchange = self._conn, self._exchange
        assert conn is not None and exchange is not None
        loop = asyncio.get_running_loop()
        while True:
            while exchange.chunks:
                chunk = exchange.chunks.popleft()
                exchange.buffered -= len(chunk)
                yield chunk
            conn.resume()
            if exchange.complete:
                return
            if exchange.error is not None:
                raise exchange.error
            exchange.waiter = loop.create_future()
            await exchange.waiter
            exchange.waiter = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_bytes()])
