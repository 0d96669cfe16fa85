"""Credits' `outbox` (events written in the transaction of the change they report), in the layout of
shared/outbox.py, whose relay publishes it."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from shared import outbox
from shared.events import Event


async def add_outbox(conn: AsyncConnection, event: Event) -> None:
    await outbox.enqueue(conn, event)
