"""Migration 0007 gives credits' outbox the layout of shared/outbox.py: rows written before it (published
or not) are carried over with their event id and request id, the shared relay publishes the pending
ones as the old relay would have, and the downgrade back to 0006 restores the old table and
credits_commit's old definition."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest

from shared.broker import Topology, declare_topology
from shared.db import create_engine
from shared.outbox import OutboxRelay, create_table_sql
from tests.conftest import eventually
from tests.credits.helpers import database_at, migrate_to

BEFORE = "0006_analytics_facts"
COMMIT_DEFINITION = "SELECT pg_get_functiondef('credits_commit(uuid, bigint, timestamptz, bigint, jsonb, jsonb)'::regprocedure)"


@pytest.fixture
async def db(make_database_url: Callable[[str], str]) -> AsyncIterator[tuple[str, asyncpg.Connection]]:
    url = make_database_url("outbox_migration")
    async with database_at(url, BEFORE) as conn:
        yield url, conn


def _body(user: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "occurred_at": "2026-01-02T03:04:05+00:00",
        "event_type": "credits.balance.low",
        "user_id": user,
        "credits_remaining": 4,
        "threshold": 5,
    }


async def _columns(conn: asyncpg.Connection, table: str) -> set[tuple[str, str, str, str | None]]:
    rows = await conn.fetch(
        "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_name = $1",
        table,
    )
    # The id's default names the table's own sequence.
    return {
        (r["column_name"], r["data_type"], r["is_nullable"], (r["column_default"] or "").replace(table, "T"))
        for r in rows
    }


OLD_ROWS = "SELECT id, routing_key, body, created_at, published_at, request_id FROM outbox ORDER BY id"


async def _old_rows(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    return [(*r[:2], orjson.loads(r[2]), *r[3:]) for r in await conn.fetch(OLD_ROWS)]


async def _shared_rows(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
    rows = await conn.fetch(
        "SELECT id, event_id, routing_key, body::text AS body, headers::text AS headers, created_at, sent_at, "
        "attempts, last_error FROM outbox ORDER BY id"
    )
    return [tuple(r) for r in rows]


async def test_rows_carried_over_published_by_the_shared_relay_and_the_downgrade_round_trips(
    db: tuple[str, asyncpg.Connection],
    rabbitmq_url: str,
    topology: Topology,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    url, conn = db
    old_commit = await conn.fetchval(COMMIT_DEFINITION)
    traced, untraced, blank, published = (_body(f"u-{uuid.uuid4().hex[:12]}") for _ in range(4))
    for body, request_id, sent in (
        (published, "rid-sent", True),
        (traced, "rid-pending", False),
        (untraced, None, False),
        (blank, "", False),
    ):
        await conn.execute(
            "INSERT INTO outbox (routing_key, body, request_id, published_at) "
            "VALUES ('credits.balance.low', $1, $2, CASE WHEN $3 THEN now() END)",
            orjson.dumps(body).decode(),
            request_id,
            sent,
        )
    old_rows = [tuple(r) for r in await conn.fetch(OLD_ROWS)]

    await migrate_to(url, "head")
    for statement in create_table_sql("layout_probe"):
        await conn.execute(statement)
    assert await _columns(conn, "outbox") == await _columns(conn, "layout_probe")
    await conn.execute("DROP TABLE layout_probe")
    assert await conn.fetchval("SELECT to_regclass('outbox_pending_idx') IS NOT NULL")
    rows = await conn.fetch("SELECT * FROM outbox ORDER BY id")
    assert [(str(r["event_id"]), orjson.loads(r["body"])) for r in rows] == [
        (b["event_id"], b) for b in (published, traced, untraced, blank)
    ]
    assert [orjson.loads(r["headers"]) for r in rows] == [
        {"x-request-id": "rid-sent"},
        {"x-request-id": "rid-pending"},
        {},
        {},
    ]
    assert [(r["sent_at"] is not None, r["attempts"], r["last_error"]) for r in rows] == [
        (True, 1, None),
        (False, 0, None),
        (False, 0, None),
        (False, 0, None),
    ]
    assert [r["created_at"] for r in rows] == [r[3] for r in old_rows]
    migrated = await _shared_rows(conn)
    assert await conn.fetchval(COMMIT_DEFINITION) != old_commit

    # Down to 0006: the old table (an empty request id was never sent, so it comes back as none), and
    # credits_commit exactly as before.
    await migrate_to(url, BEFORE, down=True)
    assert await _old_rows(conn) == [(*r[:2], orjson.loads(r[2]), *r[3:5], r[5] or None) for r in old_rows]
    assert await conn.fetchval(COMMIT_DEFINITION) == old_commit

    # And up again: the same rows as the first time.
    await migrate_to(url, "head")
    assert await _shared_rows(conn) == migrated

    # The shared relay publishes the three pending rows in order, as the old relay would have: the
    # body's event id as message id, the request id (when there was one) as x-request-id.
    users = {b["user_id"] for b in (traced, untraced, blank, published)}
    channel = await amqp_connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(await declare_topology(channel, topology), routing_key="credits.balance.low")
    received: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if orjson.loads(message.body)["user_id"] in users:  # not the events of other tests' services
            received.append(message)

    await queue.consume(on_message, no_ack=True)
    engine = create_engine(url, pool_size=2)
    relay = OutboxRelay(engine, broker_url=rabbitmq_url, topology=topology)
    try:
        assert await relay.drain() == 3
        await eventually(lambda: len(received) == 3, timeout=10)
        assert [m.message_id for m in received] == [b["event_id"] for b in (traced, untraced, blank)]
        assert [orjson.loads(m.body) for m in received] == [traced, untraced, blank]
        assert (received[0].headers or {}).get("x-request-id") == "rid-pending"
        assert await conn.fetchval("SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0
    finally:
        await relay.stop()
        await engine.dispose()
        await channel.close()
