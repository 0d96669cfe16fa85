"""Clients that leave while their requests wait for the upstream: noticed without a task per request,
and their requests cancelled (which closes their upstream calls)."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from starlette.requests import Request


async def _client_gone(request: Request) -> bool:
    """Whether the client has disconnected, without waiting for anything.

    Starlette's `is_disconnected` asks the same with an anyio cancel scope, which the proxy's profile
    showed at several percent of its CPU per request. Here the receive coroutine runs up to its
    first suspension: once the body is read, the only message left to arrive is the disconnect, so a
    receive that would have to wait means the client is still there, and it is closed unfinished.
    """
    pending = request.receive()
    if not inspect.iscoroutine(pending):
        return await request.is_disconnected()
    try:
        pending.send(None)
    except StopIteration as done:
        message = done.value or {}
        return bool(message.get("type") == "http.disconnect")
    pending.close()
    return False


class ClientWatch:
    """Notices clients that leave while their requests wait for the upstream, and cancels those
    requests (which closes their upstream calls).

    One loop looks at every waiting request every `interval` seconds, instead of a watcher task per
    request: on the hot path a request only enters and leaves a dict. A client that leaves is
    noticed within the interval; a call answered sooner is charged as it is, like any other.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._waiting: dict[asyncio.Task[Any], Request] = {}
        self._gone: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None

    def add(self, task: asyncio.Task[Any], request: Request) -> None:
        self._waiting[task] = request
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="proxy-client-watch")

    def discard(self, task: asyncio.Task[Any]) -> bool:
        """Stops watching `task`; True if it was cancelled because its client left."""
        self._waiting.pop(task, None)
        if task in self._gone:
            self._gone.discard(task)
            return True
        return False

    def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()

    async def _run(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(self.interval)
                for task, request in list(self._waiting.items()):
                    if await _client_gone(request) and self._waiting.pop(task, None) is not None:
                        self._gone.add(task)
                        task.cancel()
        finally:
            self._runner = None
