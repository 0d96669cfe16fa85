"""Run real servers for tests: an ASGI app on a real port in this event loop, or a service as a process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bound_socket(port: int = 0) -> socket.socket:
    """A socket already bound on 127.0.0.1: the port is ours from now on, so no other process can take
    it between choosing a port and listening on it (pass it to `serve_app(sock=...)`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def serve_app(
    app: Any, port: int | None = None, *, sock: socket.socket | None = None
) -> AsyncIterator[str]:
    """Serves `app` with uvicorn on 127.0.0.1 (lifespan included) and yields its base URL."""
    sock = sock or bound_socket(port or 0)
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            if task.done():
                task.result()  # raises the start-up failure
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, timeout=15)
        sock.close()


def wait_ready(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} was ready")
        try:
            r = httpx.get(url + "/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready: {last}")


@contextlib.contextmanager
def service_process(
    module: str,
    env: dict[str, str],
    port: int | None = None,
    log_path: Path | None = None,
    *,
    wrap: Callable[[list[str]], list[str]] | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Starts `python -m <module>` as a real process; yields (base_url, process); stops it afterwards
    with `stop_signal` (killed if it does not exit). `wrap` changes the command line (e.g. to run
    it under a profiler)."""
    port = port or free_port()
    full_env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(port)}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    argv = [sys.executable, "-m", module]
    proc = subprocess.Popen(
        wrap(argv) if wrap else argv,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=out,
        stderr=out,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc=proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, stop_signal)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log_path:
            out.close()  # type: ignore[union-attr]
