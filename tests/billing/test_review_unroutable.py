"""The relay marks an outbox row sent only once the broker has the message *in a queue*. Publisher
confirms alone do not say that: a message to a topic exchange with no matching binding (credits has
never declared its queue yet, or the queue was deleted) is confirmed and dropped. Billing's relay
publishes mandatory messages and keeps a returned one pending, so a paid purchase is never lost."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable

import aio_pika
import pytest
from aio_pika.exceptions import PublishError
from sqlalchemy import text

from services.billing.config import BillingSettings
from services.billing.runtime import MIGRATIONS_DIR, build_relay
from shared.broker import Topology, declare_topology
from shared.db import create_engine, migrate
from shared.events import PackPurchased
from shared.outbox import enqueue
from tests.conftest import eventually


async def test_a_message_no_queue_would_receive_stays_in_the_outbox_until_one_does(
    make_database_url: Callable[[str], str],
    rabbitmq_url: str,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
) -> None:
    namespace = f"unroutable-{uuid.uuid4().hex[:8]}"  # an exchange of our own: nothing bound to it
    settings = BillingSettings(
        database_url=make_database_url("billing_unroutable"),
        rabbitmq_url=rabbitmq_url,
        broker_namespace=namespace,
    )
    await migrate(settings.database_url, MIGRATIONS_DIR)
    engine = create_engine(settings.database_url, pool_size=2)
    relay = build_relay(settings, engine)
    event = PackPurchased(
        purchase_id=f"pur_{uuid.uuid4().hex}",
        user_id="u-unroutable",
        pack="starter",
        credits=100,
        unlocks_api=False,
        amount_cents=500,
        currency="usd",
    )
    channel = await amqp_connection.channel()
    try:
        async with engine.begin() as conn:
            assert await enqueue(conn, event)

        with pytest.raises(PublishError):  # the broker returned the message: no queue took it
            await relay.drain()
        async with engine.connect() as conn:
            sent_at, attempts = (await conn.execute(text("SELECT sent_at, attempts FROM outbox"))).one()
        assert sent_at is None and attempts == 1

        # Once a queue is bound (credits started), the same row goes out, with its event id.
        exchange = await declare_topology(channel, Topology(namespace))
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="billing.#")
        assert await relay.drain() == 1
        received: list[aio_pika.abc.AbstractIncomingMessage] = []
        await queue.consume(received.append, no_ack=True)
        await eventually(lambda: received, timeout=10)
        assert [m.message_id for m in received] == [str(event.event_id)]
        async with engine.connect() as conn:
            assert (
                await conn.execute(text("SELECT count(*) FROM outbox WHERE sent_at IS NULL"))
            ).scalar() == 0
    finally:
        await relay.stop()
        await engine.dispose()
        with contextlib.suppress(Exception):
            for name in (f"credit_proxy.events.{namespace}", f"credit_proxy.dlx.{namespace}"):
                await channel.exchange_delete(name)
            await channel.queue_delete(f"credit_proxy.dead_letters.{namespace}")
        await channel.close()
