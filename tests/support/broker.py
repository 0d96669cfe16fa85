"""Broker housekeeping for tests: a run's exchanges and queues are durable, so they are removed at the end."""

from __future__ import annotations

import contextlib

import aio_pika

from shared.broker import Topology

# Every work queue a service of ours declares (base names; the topology adds the namespace).
WORK_QUEUES = ("credits.billing-events", "ai.requests")


async def delete_namespace(rabbitmq_url: str, namespace: str) -> None:
    """Deletes the namespace's work queues, dead-letter queue and exchanges; best effort."""
    topology = Topology(namespace)
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(rabbitmq_url)
        async with connection:
            # A failed delete closes its channel, so each delete gets a fresh one.
            for queue in (*(topology.name(q) for q in WORK_QUEUES), topology.dead_letter_queue):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(queue)
            for exchange in (topology.events_exchange, topology.dead_letter_exchange):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(exchange)
