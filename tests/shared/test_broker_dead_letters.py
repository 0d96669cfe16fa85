"""Dead letters at least once: a message a consumer rejects stays in its quorum queue until the
dead-letter queue has it (at most once, the default, dropped it when that queue could not take it).
A queue declared before, with the older arguments, is adopted as it is and gets the same strategy
from the policy in deploy/rabbitmq/definitions.json.

What the broker holds is read with `rabbitmqctl` (the management API is not always enabled): the
quorum queue's `messages` counts a dead-lettered message it still keeps for the dead-letter queue
(as of the broker's last statistics, published every 5 s)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid

import aio_pika
import orjson
import pytest

from shared.broker import DEAD_LETTER_POLICY, PoisonMessage, Topology, consume, declare_topology
from tests.conftest import eventually
from tests.support.dead_letters import declare_dead_letter_queue, next_dead_letter

pytestmark = pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl")

LEGACY_ARGUMENTS = {"x-queue-type": "quorum", "x-delivery-limit": 5}


def _ctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


async def _messages(queue: str) -> int:
    """Every message the queue holds, including dead letters it keeps until the DLQ confirms them."""
    out = await asyncio.to_thread(_ctl, "list_queues", "--no-table-headers", "name", "messages")
    for line in out.splitlines():
        name, _, count = line.rpartition("\t")
        if name == queue:
            return int(count)
    raise AssertionError(f"queue {queue} not found")


async def _poison(connection: aio_pika.abc.AbstractRobustConnection, queue: str) -> None:
    channel = await connection.channel()
    await channel.default_exchange.publish(
        aio_pika.Message(b"not json", message_id="poison"), routing_key=queue
    )
    await channel.close()


# The broker publishes queue statistics every 5 s (collect_statistics_interval): a count read this long
# after an event reflects it.
STATS_INTERVAL = 5.5


async def _dead_letter_round_trip(
    connection: aio_pika.abc.AbstractRobustConnection, topology: Topology, base: str
) -> None:
    """With the dead-letter queue unbound a rejected message is kept; bound again, the next reaches it."""
    queue = topology.name(base)
    rejected = asyncio.Event()

    async def reject_everything(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        rejected.set()
        raise PoisonMessage("test")

    channel, consumer_queue, tag = await consume(connection, topology, base, reject_everything)
    side = await connection.channel()
    dlq = await declare_dead_letter_queue(side, topology)
    try:
        await dlq.unbind(topology.dead_letter_exchange)
        await _poison(connection, queue)
        await asyncio.wait_for(rejected.wait(), 10)
        await asyncio.sleep(STATS_INTERVAL)
        assert await _messages(queue) == 1  # kept: the DLX routes nowhere just now
        await dlq.purge()
        await dlq.bind(topology.dead_letter_exchange)
        await _poison(connection, queue)
        msg = await next_dead_letter(dlq, timeout=15)
        assert msg.body == b"not json"
        await msg.ack()
    finally:
        await consumer_queue.cancel(tag)
        await channel.close()
        await side.close()


@pytest.fixture
def own_topology() -> Topology:
    return Topology(f"test-dl-{uuid.uuid4().hex[:8]}")


async def _cleanup(connection: aio_pika.abc.AbstractRobustConnection, topology: Topology, base: str) -> None:
    for queue in (topology.name(base), topology.dead_letter_queue):
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.close()
    for exchange in (topology.events_exchange, topology.dead_letter_exchange):
        channel = await connection.channel()
        await channel.exchange_delete(exchange)
        await channel.close()


async def test_a_rejected_message_is_kept_until_the_dead_letter_queue_takes_it(
    amqp_connection: aio_pika.abc.AbstractRobustConnection, own_topology: Topology
) -> None:
    try:
        await _dead_letter_round_trip(amqp_connection, own_topology, "dl-new")
    finally:
        await _cleanup(amqp_connection, own_topology, "dl-new")


async def test_a_queue_declared_with_the_older_arguments_is_adopted_and_the_policy_makes_it_at_least_once(
    amqp_connection: aio_pika.abc.AbstractRobustConnection, own_topology: Topology
) -> None:
    base = "dl-legacy"
    queue = own_topology.name(base)
    channel = await amqp_connection.channel()
    await declare_topology(channel, own_topology)
    await channel.declare_queue(
        queue,
        durable=True,
        arguments={**LEGACY_ARGUMENTS, "x-dead-letter-exchange": own_topology.dead_letter_exchange},
    )
    await channel.close()
    policy = f"test-{own_topology.namespace}"
    # The deployed policy's definition, limited to this test's queue.
    await asyncio.to_thread(
        _ctl,
        "set_policy",
        "--apply-to",
        "queues",
        "--priority",
        "10",
        policy,
        f"^{queue}$",
        orjson.dumps(DEAD_LETTER_POLICY).decode(),
    )
    try:
        await eventually(
            lambda: policy in _ctl("list_queues", "--no-table-headers", "name", "policy"), timeout=10
        )
        await _dead_letter_round_trip(amqp_connection, own_topology, base)
    finally:
        await asyncio.to_thread(_ctl, "clear_policy", policy)
        await _cleanup(amqp_connection, own_topology, base)
