from __future__ import annotations

import asyncio

import aio_pika
import orjson

from shared.broker import PoisonMessage, Publisher, Topology, consume, parse_json
from shared.events import PackPurchased
from tests.conftest import eventually
from tests.support.dead_letters import declare_dead_letter_queue, next_dead_letter


async def test_poison_goes_to_dead_letters_and_next_message_is_processed(
    amqp_connection: aio_pika.abc.AbstractRobustConnection, topology: Topology
) -> None:
    seen: list[dict[str, object]] = []

    async def handler(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        data = parse_json(message)
        if "purchase_id" not in data:
            raise PoisonMessage("no purchase_id")
        seen.append(data)

    channel, queue, tag = await consume(
        amqp_connection, topology, "shared-test", handler, routing_keys=["billing.pack.purchased"]
    )
    publisher = Publisher(amqp_connection, topology)
    try:
        garbage = aio_pika.Message(
            b"\x00not json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id="g1"
        )
        await publisher.publish_raw(garbage, "billing.pack.purchased")
        event = PackPurchased(
            purchase_id="p1",
            user_id="u1",
            pack="pro",
            credits=1200,
            unlocks_api=True,
            amount_cents=3000,
            currency="usd",
        )
        await publisher.publish(event)
        await eventually(lambda: seen, timeout=10)
        assert seen[0]["purchase_id"] == "p1" and seen[0]["event_id"] == str(event.event_id)

        dead = await declare_dead_letter_queue(await amqp_connection.channel(), topology)
        msg = await next_dead_letter(dead, timeout=10)
        assert msg.body == b"\x00not json"
        await msg.ack()
    finally:
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        await channel.close()


async def test_published_message_has_contract_properties(
    amqp_connection: aio_pika.abc.AbstractRobustConnection, topology: Topology
) -> None:
    channel = await amqp_connection.channel()
    publisher = Publisher(amqp_connection, topology)
    await publisher._ready()
    q = await channel.declare_queue("", exclusive=True)
    await q.bind(topology.events_exchange, routing_key="billing.#")
    event = PackPurchased(
        purchase_id="p2",
        user_id="u",
        pack="starter",
        credits=100,
        unlocks_api=False,
        amount_cents=500,
        currency="usd",
    )
    await publisher.publish(event)
    msg = await eventually(lambda: q.get(fail=False), timeout=5)
    assert msg.content_type == "application/json"
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.message_id == str(event.event_id)
    assert msg.type == "billing.pack.purchased"
    body = orjson.loads(msg.body)
    assert body["event_type"] == "billing.pack.purchased" and body["occurred_at"].endswith("Z")
    await channel.close()
    await asyncio.sleep(0)
