"""Request limits of every service as it really runs (`python -m services.<name>`, uvicorn with
httptools), probed with raw sockets: a chunked body past MAX_BODY_BYTES is answered 413 and not read
on; unfinished giant headers are refused (431) without the process growing; connections that send
their headers or body too slowly (slowloris) are closed."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import REPO_ROOT, free_port

MAX_BODY = 1024 * 1024
HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
LIMITS = {
    "MAX_BODY_BYTES": str(MAX_BODY),
    "HEADER_READ_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
    "BODY_READ_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
    "LOG_LEVEL": "WARNING",
}


@contextlib.contextmanager
def service(module: str, env: dict[str, str], log: Path) -> Iterator[tuple[int, int]]:
    """`python -m <module>` alive (its /healthz answers); yields (port, pid)."""
    port = free_port()
    full_env = {**os.environ, **LIMITS, **env, "HOST": "127.0.0.1", "PORT": str(port)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module], cwd=REPO_ROOT, env=full_env, stdout=out, stderr=out
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, f"{module} exited: {log.read_text()[-2000:]}"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"{module} did not start"
                time.sleep(0.2)
            yield port, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


class Reader(threading.Thread):
    """Reads a socket to its end in the background (so an answer sent before a reset is not lost)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = b""
        self.closed_at: float | None = None

    def run(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.data += chunk
        except OSError:
            pass
        self.closed_at = time.monotonic()


def send_until_refused(sock: socket.socket, head: bytes, pieces: Iterator[bytes]) -> int:
    """Sends `head` then `pieces` until the server stops taking them; returns the bytes sent."""
    sent = 0
    try:
        sock.sendall(head)
        for piece in pieces:
            sock.sendall(piece)
            sent += len(piece)
    except OSError:  # reset or broken pipe: the server closed the connection
        pass
    return sent


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, broker_namespace: str) -> Iterator[tuple[int, int]]:
    env = {
        "CREDITS_URL": f"http://127.0.0.1:{free_port()}",
        "BILLING_URL": f"http://127.0.0.1:{free_port()}",
        "WORKER_ENABLED": "false",
        "BROKER_NAMESPACE": broker_namespace,
    }
    with service("services.proxy", env, tmp_path_factory.mktemp("limits") / "proxy.log") as running:
        yield running


def test_chunked_body_past_the_limit_is_413_and_not_read_on(proxy: tuple[int, int]) -> None:
    port, _ = proxy
    total = 100 * 1024 * 1024
    piece = b"x" * 65536
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    head = (
        b"POST /v1/webhooks/stripe HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    sock = connect(port)
    reader = Reader(sock)
    reader.start()
    sent = send_until_refused(sock, head, (chunk for _ in range(total // len(piece))))
    reader.join(timeout=15)
    sock.close()
    assert reader.data.startswith(b"HTTP/1.1 413"), reader.data[:300]
    assert b'"payload_too_large"' in reader.data
    # Past the limit only what the sockets' buffers hold on the way: before, all 100 MB were read.
    assert sent < 24 * 1024 * 1024, sent
    # The server is fine afterwards.
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


def test_unfinished_giant_headers_are_refused_without_growing_the_process(proxy: tuple[int, int]) -> None:
    port, pid = proxy
    before = rss_bytes(pid)
    sock = connect(port)
    reader = Reader(sock)
    reader.start()
    line = b"a" * 65536
    sent = send_until_refused(
        sock, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Big: ", (line for _ in range(20 * 16))
    )
    reader.join(timeout=15)
    sock.close()
    grown = rss_bytes(pid) - before
    assert reader.data.startswith(b"HTTP/1.1 431"), reader.data[:300]
    assert b'"headers_too_large"' in reader.data
    assert sent < 16 * 1024 * 1024, sent  # not all 20 MB were taken
    assert grown < 16 * 1024 * 1024, grown  # before: +200 MB


def test_slow_clients_are_disconnected(proxy: tuple[int, int]) -> None:
    port, _ = proxy
    silent = [connect(port) for _ in range(20)]
    slow_headers = [connect(port) for _ in range(20)]
    slow_body = [connect(port) for _ in range(20)]
    for sock in slow_headers:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
    for sock in slow_body:
        sock.sendall(
            b"POST /v1/webhooks/stripe HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
    readers = {id(s): Reader(s) for s in silent + slow_headers + slow_body}
    for reader in readers.values():
        reader.start()
    started = time.monotonic()
    # A header line and a body byte every half second: always sending, never finishing.
    while time.monotonic() - started < HEADER_TIMEOUT + BODY_TIMEOUT + 3:
        for sock in slow_headers:
            with contextlib.suppress(OSError):
                sock.sendall(b"X-Drip: 1\r\n")
        for sock in slow_body:
            with contextlib.suppress(OSError):
                sock.sendall(b" ")
        if all(r.closed_at is not None for r in readers.values()):
            break
        time.sleep(0.5)
    still_open = [r for r in readers.values() if r.closed_at is None]
    for sock in silent + slow_headers + slow_body:
        sock.close()
    assert not still_open, f"{len(still_open)} of {len(readers)} slow connections still open"
    for sock in slow_headers + slow_body:
        data = readers[id(sock)].data
        assert data.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in data, data[:300]
    closed_after = max(r.closed_at or 0 for r in readers.values()) - started
    assert closed_after < HEADER_TIMEOUT + BODY_TIMEOUT + 2, closed_after
    # A normal request on a fresh connection is served as before.
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200


def test_a_nul_character_in_a_header_is_400_in_the_envelope(proxy: tuple[int, int]) -> None:
    port, _ = proxy
    sock = connect(port)
    reader = Reader(sock)
    reader.start()
    sock.sendall(b"GET /v1/account HTTP/1.1\r\nHost: gateway\r\nX-User-Id: nul\x00user\r\n\r\n")
    reader.join(timeout=10)
    sock.close()
    assert reader.data.startswith(b"HTTP/1.1 400"), reader.data[:300]
    assert b'"code":"invalid_request"' in reader.data, reader.data


def test_large_but_allowed_requests_on_one_connection_are_served(proxy: tuple[int, int]) -> None:
    """Headers near the limit and bodies near MAX_BODY_BYTES, pipelined on one connection (reads
    that hold one request's body and the next one's headers), are served, not refused."""
    port, _ = proxy
    body = b'{"id": "' + b"x" * (MAX_BODY - 100) + b'"}'
    big_header = b"X-Big: " + b"h" * 60_000 + b"\r\n"
    post = (
        b"POST /v1/webhooks/stripe HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + big_header
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )
    sock = connect(port)
    reader = Reader(sock)
    reader.start()
    sock.sendall(post * 3 + b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
    reader.join(timeout=30)
    sock.close()
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reader.data)
    # The webhook's answers come from billing being down (503); what matters: none refused for size.
    assert len(statuses) == 4 and statuses[-1] == b"200", reader.data.decode(errors="replace")
    assert not {b"408", b"413", b"431"} & set(statuses), statuses


@pytest.mark.parametrize("module", ["services.credits", "services.billing"])
def test_every_service_runs_with_the_limits(
    module: str,
    tmp_path: Path,
    make_database_url: Callable[[str], str],
    redis_url: str,
    broker_namespace: str,
) -> None:
    name = module.split(".")[1]
    env = {
        "DATABASE_URL": make_database_url(f"limits_{name}"),
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": f"limits-{broker_namespace}",
        "BROKER_NAMESPACE": broker_namespace,
        "STRIPE_API_KEY": "",
    }
    with service(module, env, tmp_path / f"{name}.log") as (port, _):
        giant = connect(port)
        giant_reader = Reader(giant)
        giant_reader.start()
        send_until_refused(giant, b"GET /healthz HTTP/1.1\r\nX-Big: ", (b"a" * 65536 for _ in range(64)))
        slow = connect(port)
        slow_reader = Reader(slow)
        slow_reader.start()
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        giant_reader.join(timeout=10)
        slow_reader.join(timeout=HEADER_TIMEOUT + 8)
        giant.close()
        slow.close()
        assert giant_reader.data.startswith(b"HTTP/1.1 431"), giant_reader.data[:200]
        assert slow_reader.data.startswith(b"HTTP/1.1 408"), slow_reader.data[:200]
