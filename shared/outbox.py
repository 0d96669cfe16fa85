"""Transactional outbox: events written in the caller's database transaction, published later.

A service that must never lose a message (billing's "pack purchased", credits' events) writes the event
row in the same PostgreSQL transaction as the state change it reports (`enqueue`; credits' commit
function inserts `credits.balance.low` rows itself, in this layout). `OutboxRelay` runs beside the web
app: it takes pending rows with `FOR UPDATE SKIP LOCKED` (so several processes can relay the same
table without publishing a row twice at once), publishes them in order on a confirm-mode channel, and
marks them sent only after the broker confirmed. When the broker is unreachable the rows simply wait,
the relay retries with exponential backoff, and the service keeps answering requests.

With `require_route`, a message the broker returns as unroutable (no queue bound to its routing key)
counts as not published: the row stays pending and is retried, rather than confirmed and lost.

Delivery is at least once: a crash between the broker's confirm and the `sent_at` update republishes
the row, with the same `message_id` (= `event_id`), which consumers deduplicate.

Wake-ups: call `wake()` after committing a transaction that enqueued something; the relay also polls
every `poll_interval` seconds, which covers rows written by other processes or before a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from typing import Any

import orjson
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import PublishError
from prometheus_client import Counter, Gauge
from sqlalchemy import text
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.broker import Publisher, Topology, build_message, connect
from shared.events import Event
from shared.logs import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger("shared.outbox")

OUTBOX_PENDING = Gauge("outbox_pending_messages", "Outbox rows not yet confirmed by the broker", ["table"])
OUTBOX_LAG = Gauge(
    "outbox_oldest_pending_age_seconds", "Age of the oldest unpublished outbox row (0 when none)", ["table"]
)
OUTBOX_PUBLISHED = Counter("outbox_published_total", "Outbox rows published and confirmed", ["table"])
OUTBOX_FAILURES = Counter("outbox_publish_failures_total", "Failed outbox relay rounds", ["table"])

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _checked(table: str) -> str:
    # The table name is interpolated into SQL, so only plain identifiers are accepted.
    if not _IDENTIFIER.match(table):
        raise ValueError(f"invalid outbox table name: {table!r}")
    return table


def create_table_sql(table: str = "outbox") -> list[str]:
    """DDL for an outbox table; a service's migration runs these with `op.execute`."""
    t = _checked(table)
    return [
        f"""
        CREATE TABLE {t} (
            id BIGSERIAL PRIMARY KEY,
            event_id UUID NOT NULL UNIQUE,
            routing_key TEXT NOT NULL,
            body JSONB NOT NULL,
            headers JSONB NOT NULL DEFAULT '{{}}'::jsonb,
            created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            sent_at TIMESTAMPTZ,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT
        )
        """,
        f"CREATE INDEX {t}_pending_idx ON {t} (id) WHERE sent_at IS NULL",
    ]


async def enqueue(conn: AsyncConnection, event: Event, *, table: str = "outbox") -> bool:
    """Adds `event` to the outbox inside the caller's transaction. False if that event id is already there."""
    t = _checked(table)
    headers: dict[str, str] = {}
    rid = current_request_id()
    if rid:
        headers[REQUEST_ID_HEADER] = rid
    result = await conn.execute(
        text(
            f"INSERT INTO {t} (event_id, routing_key, body, headers) "
            "VALUES (:event_id, :routing_key, CAST(:body AS JSONB), CAST(:headers AS JSONB)) "
            "ON CONFLICT (event_id) DO NOTHING RETURNING id"
        ),
        {
            "event_id": event.event_id,
            "routing_key": event.routing_key,
            "body": orjson.dumps(event.body()).decode(),
            "headers": orjson.dumps(headers).decode(),
        },
    )
    return result.first() is not None


def _json_bytes(value: Any) -> bytes:
    # The driver may hand JSONB back decoded or as text, depending on its codecs.
    return value.encode() if isinstance(value, str) else orjson.dumps(value)


def _json_object(value: Any) -> dict[str, Any]:
    decoded = orjson.loads(value) if isinstance(value, str | bytes) else value
    return dict(decoded) if isinstance(decoded, dict) else {}


class OutboxRelay:
    """Publishes pending outbox rows to the events exchange; one asyncio task per process."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        broker_url: str,
        topology: Topology,
        table: str = "outbox",
        connection_name: str = "outbox-relay",
        poll_interval: float = 1.0,
        batch_size: int = 100,
        min_backoff: float = 0.2,
        max_backoff: float = 30.0,
        require_route: bool = False,
    ) -> None:
        self._engine = engine
        self._broker_url = broker_url
        self._topology = topology
        self._table = _checked(table)
        self._connection_name = connection_name
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        # A row no queue would receive stays pending (retried) instead of being confirmed and dropped.
        self._require_route = require_route
        self._connection: AbstractRobustConnection | None = None
        self._publisher: Publisher | None = None
        self._connected_url: str | None = None  # the broker `_connection` was opened to
        self._wakeup = asyncio.Event()
        self._reconfigured = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._healthy = False
        self.last_error: str | None = "not started"

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"outbox-relay-{self._table}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._disconnect()

    def wake(self) -> None:
        """Call after a commit that enqueued rows, so they go out now rather than at the next poll."""
        self._wakeup.set()

    def set_broker_url(self, url: str) -> None:
        """Points the relay at another broker (reconnects at once, skipping any backoff in progress)."""
        self._broker_url = url
        self._healthy = False
        self._reconfigured.set()
        self._wakeup.set()

    async def check(self) -> None:
        """Readiness: raises while the relay cannot reach the broker."""
        if not self._healthy or self._connection is None or self._connection.is_closed:
            raise ConnectionError(self.last_error or "broker not connected")

    # -- work --------------------------------------------------------------------------------------

    async def drain(self) -> int:
        """Publishes every pending row now; returns how many. Raises if the broker fails."""
        await self._ensure_connected()
        total = 0
        while True:
            published = await self._publish_batch()
            total += published
            if published < self._batch_size:
                return total

    async def pending(self) -> tuple[int, float]:
        """(pending row count, age in seconds of the oldest pending row)."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        f"SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0) "
                        f"FROM {self._table} WHERE sent_at IS NULL"
                    )
                )
            ).one()
        return int(row[0]), float(row[1])

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            try:
                await self.drain()
                self._healthy = True
                self.last_error = None
                backoff = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A returned message (no queue bound yet) means the broker itself works: stay ready
                # and connected, and retry the row.
                unroutable = isinstance(exc, PublishError)
                self._healthy = unroutable
                self.last_error = f"{type(exc).__name__}: {exc}"
                OUTBOX_FAILURES.labels(self._table).inc()
                backoff = min(max(backoff * 2, self._min_backoff), self._max_backoff)
                log.warning("outbox relay round failed (%s); retrying in %.1fs", self.last_error, backoff)
                if not unroutable:
                    await self._disconnect()
            await self._update_metrics()
            if backoff:
                # While failing, only a new broker URL cuts the wait short: new rows must not turn the
                # backoff into a busy loop against a broker that is down.
                await self._wait(self._reconfigured, backoff)
            else:
                await self._wait(self._wakeup, self._poll_interval)
            self._reconfigured.clear()
            self._wakeup.clear()

    @staticmethod
    async def _wait(event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def _update_metrics(self) -> None:
        try:
            count, age = await self.pending()
        except Exception as exc:  # the database may be down too; metrics must not kill the relay
            log.warning("outbox metrics query failed: %s", exc)
            return
        OUTBOX_PENDING.labels(self._table).set(count)
        OUTBOX_LAG.labels(self._table).set(age)

    async def _ensure_connected(self) -> Publisher:
        # The run loop clears `_reconfigured` before it drains, so a new URL is told by the URL itself.
        if self._connected_url != self._broker_url:
            await self._disconnect()
        if self._publisher is None or self._connection is None or self._connection.is_closed:
            await self._disconnect()
            self._connection = await connect(self._broker_url, self._connection_name)
            self._connected_url = self._broker_url
            self._publisher = Publisher(
                self._connection, self._topology, on_return_raises=self._require_route
            )
        return self._publisher

    async def _disconnect(self) -> None:
        connection, self._connection, self._publisher = self._connection, None, None
        self._connected_url = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)

    async def _publish_batch(self) -> int:
        publisher = await self._ensure_connected()
        failure: Exception | None = None
        async with self._engine.begin() as conn:
            rows: Sequence[Row[Any]] = (
                await conn.execute(
                    text(
                        f"SELECT id, event_id, routing_key, body, headers FROM {self._table} "
                        "WHERE sent_at IS NULL ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
                    ),
                    {"limit": self._batch_size},
                )
            ).all()
            sent: list[int] = []
            # In order, one confirm at a time: a purchase's "refunded" never overtakes its "purchased".
            for row in rows:
                try:
                    message = build_message(
                        _json_bytes(row.body),
                        message_id=str(row.event_id),
                        type_=row.routing_key,
                        headers=_json_object(row.headers),
                    )
                    await publisher.publish_raw(message, row.routing_key)
                except Exception as exc:
                    failure = exc
                    break
                sent.append(row.id)
            if sent:
                await conn.execute(
                    text(
                        f"UPDATE {self._table} SET sent_at = now(), attempts = attempts + 1 "
                        "WHERE id = ANY(:ids)"
                    ),
                    {"ids": sent},
                )
                OUTBOX_PUBLISHED.labels(self._table).inc(len(sent))
            if failure is not None and len(sent) < len(rows):
                await conn.execute(
                    text(
                        f"UPDATE {self._table} SET attempts = attempts + 1, last_error = :error WHERE id = :id"
                    ),
                    {"id": rows[len(sent)].id, "error": f"{type(failure).__name__}: {failure}"[:1000]},
                )
        if failure is not None:
            raise failure
        return len(rows)
