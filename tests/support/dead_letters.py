"""The broker's dead-letter queue as tests read it. (Not in `broker.py`: `tests/conftest.py` imports
that, and this needs its `eventually`.)"""

from __future__ import annotations

from typing import cast

import aio_pika

from shared.broker import Topology
from tests.conftest import eventually


async def declare_dead_letter_queue(
    channel: aio_pika.abc.AbstractChannel, topology: Topology
) -> aio_pika.abc.AbstractQueue:
    return await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )


async def next_dead_letter(
    queue: aio_pika.abc.AbstractQueue, timeout: float
) -> aio_pika.abc.AbstractIncomingMessage:
    """The next message in the dead-letter queue, once one is there (fails after `timeout` seconds)."""

    async def dead_letter() -> aio_pika.abc.AbstractIncomingMessage | None:
        return await queue.get(fail=False)

    return cast(aio_pika.abc.AbstractIncomingMessage, await eventually(dead_letter, timeout=timeout))
