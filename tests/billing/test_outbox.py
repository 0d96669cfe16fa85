"""shared.outbox: rows written in the caller's transaction; several relays on one table publish each
row once, in order, and a rolled-back transaction publishes nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.broker import Topology
from shared.db import create_engine, ensure_database
from shared.events import PackPurchased
from shared.outbox import OutboxRelay, create_table_sql, enqueue
from tests.billing.conftest import Captured
from tests.conftest import eventually


@pytest.fixture(scope="module")
async def outbox_engine(make_database_url: Callable[[str], str]) -> AsyncIterator[AsyncEngine]:
    url = make_database_url("outbox")
    await ensure_database(url)
    engine = create_engine(url, pool_size=4)
    async with engine.begin() as conn:
        for statement in create_table_sql("test_outbox"):
            await conn.execute(text(statement))
    yield engine
    await engine.dispose()


def _event(batch: str, n: int) -> PackPurchased:
    return PackPurchased(
        purchase_id=f"{batch}-{n:03d}",
        user_id="outbox-user",
        pack="starter",
        credits=100,
        unlocks_api=False,
        amount_cents=500,
        currency="usd",
    )


async def test_two_relays_publish_every_row_once(
    outbox_engine: AsyncEngine, captured: Captured, rabbitmq_url: str, topology: Topology
) -> None:
    batch = uuid.uuid4().hex[:8]
    for start in range(0, 60, 10):
        async with outbox_engine.begin() as conn:
            for n in range(start, start + 10):
                assert await enqueue(conn, _event(batch, n), table="test_outbox")
    # A rolled-back transaction leaves no row behind.
    with pytest.raises(RuntimeError):
        async with outbox_engine.begin() as conn:
            await enqueue(conn, _event(batch, 999), table="test_outbox")
            raise RuntimeError("the caller's transaction fails")

    relays = [
        OutboxRelay(
            outbox_engine, broker_url=rabbitmq_url, topology=topology, table="test_outbox", batch_size=7
        )
        for _ in range(2)
    ]
    try:
        sent = await asyncio.gather(*(relay.drain() for relay in relays))
        assert sum(sent) == 60
        mine = lambda: [b for _, b, _ in captured.messages if b["purchase_id"].startswith(batch)]  # noqa: E731
        await eventually(lambda: len(mine()) >= 60, timeout=20)
        await asyncio.sleep(1)
        ids = [b["purchase_id"] for b in mine()]
        assert sorted(ids) == [f"{batch}-{n:03d}" for n in range(60)]  # each once, the rolled-back one never
        count, age = await relays[0].pending()
        assert (count, age) == (0, 0.0)
        # Draining again publishes nothing: rows are marked sent.
        assert await relays[1].drain() == 0
    finally:
        for relay in relays:
            await relay.stop()


async def test_relay_started_in_the_background_publishes_after_wake(
    outbox_engine: AsyncEngine, captured: Captured, rabbitmq_url: str, topology: Topology
) -> None:
    relay = OutboxRelay(
        outbox_engine, broker_url=rabbitmq_url, topology=topology, table="test_outbox", poll_interval=60
    )
    relay.start()
    try:
        await eventually(lambda: relay.last_error is None, timeout=10)
        await relay.check()
        batch = uuid.uuid4().hex[:8]
        async with outbox_engine.begin() as conn:
            await enqueue(conn, _event(batch, 1), table="test_outbox")
        relay.wake()  # the poll interval is a minute: only the wake-up can explain a prompt delivery
        await eventually(lambda: captured.of(f"{batch}-001"), timeout=10)
    finally:
        await relay.stop()
    with pytest.raises(ConnectionError):
        await relay.check()
