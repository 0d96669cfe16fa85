"""Relays the outbox table to RabbitMQ with publisher confirms.

Events are written to `outbox` in the same transaction as the change they report, so a crash after the
commit cannot lose them; a row is marked published only after the broker confirmed it (a crash in
between publishes it again with the same event_id, which consumers deduplicate).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from services.credits.stores import outbox as outbox_store
from shared.broker import Publisher, build_message
from shared.logs import REQUEST_ID_HEADER

log = logging.getLogger("credits.outbox")


class OutboxRelay:
    def __init__(self, engine: AsyncEngine, publisher: Publisher, *, poll_seconds: float = 1.0) -> None:
        self._engine = engine
        self._publisher = publisher
        self._poll = poll_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="credits-outbox-relay")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def publish_pending(self, batch: int = 100) -> int:
        sent = 0
        while True:
            async with self._engine.begin() as conn:
                rows = await outbox_store.claim_outbox(conn, batch)
                published: list[int] = []
                for row in rows:
                    body = orjson.loads(row.body)
                    # The request id of the change the event reports, so it follows the event onward.
                    headers = {REQUEST_ID_HEADER: row.request_id} if row.request_id else None
                    message = build_message(
                        row.body.encode(),
                        message_id=str(body["event_id"]),
                        type_=row.routing_key,
                        headers=headers,
                    )
                    await self._publisher.publish_raw(message, row.routing_key)
                    published.append(row.id)
                if published:
                    await outbox_store.mark_published(conn, published, datetime.now(UTC))
            sent += len(rows)
            if len(rows) < batch:
                return sent

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
            self._wake.clear()
