"""Running the stand-in: in the foreground, or in a background thread for tests."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from types import TracebackType

import uvicorn

from .app import StandinApp, create_app
from .config import StandinConfig


def _uvicorn_config(app: StandinApp, **kwargs: object) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        access_log=False,
        server_header=False,
        lifespan="on",
        # Held ("timeout"/"stall") requests must not keep a stopping server alive.
        timeout_graceful_shutdown=1,
        **kwargs,  # type: ignore[arg-type]
    )


class StandinServer:
    """A stand-in on its own event loop in a daemon thread; a context manager that stops it."""

    def __init__(
        self, config: StandinConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.app = create_app(config if config is not None else StandinConfig())
        self.host = host
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        netloc = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.url = f"http://{netloc}"
        # What the openai SDK takes as base_url.
        self.base_url = f"{self.url}/v1"
        self._server = uvicorn.Server(_uvicorn_config(self.app, log_config=None, log_level="warning"))
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"standin:{self.port}",
            daemon=True,
        )

    def start(self, timeout: float = 10.0) -> StandinServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"stand-in did not start on {self.url}")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.app.release_held()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> StandinServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def run_in_thread(
    config: StandinConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> StandinServer:
    """Start a stand-in on ``port`` (0: any free one); use ``.base_url`` and ``.stop()``, or ``with``."""
    return StandinServer(config, host=host, port=port).start()


def serve() -> None:
    config = StandinConfig.from_env()
    host = os.environ.get("STANDIN_HOST") or os.environ.get("HOST") or "127.0.0.1"
    port = int(os.environ.get("STANDIN_PORT") or os.environ.get("PORT") or 8010)
    log_level = os.environ.get("STANDIN_LOG_LEVEL", "info")
    server = uvicorn.Server(_uvicorn_config(create_app(config), host=host, port=port, log_level=log_level))
    # uvicorn re-raises the Ctrl-C it handled once it has shut down; stopping is the expected outcome.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
