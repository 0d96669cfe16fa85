"""SQL of credits' `outbox` (events written in the transaction of the change they report)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.events import Event
from shared.logs import current_request_id


async def add_outbox(conn: AsyncConnection, event: Event) -> None:
    await conn.execute(
        text("INSERT INTO outbox (routing_key, body, request_id) VALUES (:k, :b, :r)"),
        {"k": event.routing_key, "b": orjson.dumps(event.body()).decode(), "r": current_request_id()},
    )


async def claim_outbox(conn: AsyncConnection, limit: int) -> list[Any]:
    rows = await conn.execute(
        text(
            "SELECT id, routing_key, body, request_id FROM outbox WHERE published_at IS NULL "
            "ORDER BY id LIMIT :l "
            "FOR UPDATE SKIP LOCKED"
        ),
        {"l": limit},
    )
    return list(rows)


async def mark_published(conn: AsyncConnection, ids: Sequence[int], when: datetime) -> None:
    await conn.execute(
        text("UPDATE outbox SET published_at = :w WHERE id = ANY(CAST(:ids AS bigint[]))"),
        {"w": when, "ids": list(ids)},
    )
