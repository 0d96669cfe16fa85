"""The ai.requests worker (docs/messages.md, AI jobs): a job is charged once however often it is delivered,
answered on reply_to with its correlation_id and as an event; failures release the hold; garbage is
dead-lettered."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import orjson
import pytest

from shared.broker import Topology
from tests.conftest import eventually
from tests.proxy.conftest import Credits


async def _listen(
    channel: aio_pika.abc.AbstractChannel, topology: Topology
) -> tuple[aio_pika.abc.AbstractQueue, aio_pika.abc.AbstractQueue]:
    replies = await channel.declare_queue(f"test-replies-{uuid.uuid4().hex[:8]}", exclusive=True)
    events = await channel.declare_queue(f"test-events-{uuid.uuid4().hex[:8]}", exclusive=True)
    exchange = await channel.declare_exchange(
        topology.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    await events.bind(exchange, routing_key="ai.job.*")
    return replies, events


async def _get(
    queue: aio_pika.abc.AbstractQueue, timeout: float = 20
) -> aio_pika.abc.AbstractIncomingMessage:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        message = await queue.get(fail=False)
        if message is not None:
            await message.ack()
            return message
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"nothing arrived on {queue.name}")
        await asyncio.sleep(0.05)


async def _send(
    channel, topology: Topology, body: bytes, reply_to: str | None = None, correlation_id: str | None = None
) -> None:  # type: ignore[no-untyped-def]
    await channel.default_exchange.publish(
        aio_pika.Message(
            body, content_type="application/json", reply_to=reply_to, correlation_id=correlation_id
        ),
        routing_key=topology.name("ai.requests"),
    )


@pytest.mark.both_redis
async def test_job_completes_replies_and_is_charged_once(
    proxy, amqp_connection, topology: Topology, credits: Credits
) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(10)
    channel = await amqp_connection.channel()
    replies, events = await _listen(channel, topology)
    job = {
        "job_id": f"job-{uuid.uuid4().hex[:8]}",
        "user_id": user,
        "operation": "chat.completions",
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]},
    }
    await _send(channel, topology, orjson.dumps(job), replies.name, "corr-1")
    reply = await _get(replies)
    assert reply.correlation_id == "corr-1"
    body = orjson.loads(reply.body)
    assert body["event_type"] == "ai.job.completed" and body["job_id"] == job["job_id"]
    assert body["credits_charged"] == 1 and body["response"]["object"] == "chat.completion"
    event = orjson.loads((await _get(events)).body)
    assert event["event_id"] == body["event_id"]
    await credits.settled(user, 9, usage_total=1)
    # The same job again (a redelivery): answered again, never charged twice.
    await _send(channel, topology, orjson.dumps(job), replies.name, "corr-2")
    again = await _get(replies)
    assert again.correlation_id == "corr-2"
    assert orjson.loads(again.body)["credits_charged"] == 1
    await asyncio.sleep(0.5)
    await credits.settled(user, 9, usage_total=1)
    await channel.close()


async def test_failing_upstream_is_retried_then_failed_with_hold_released(
    proxy, amqp_connection, topology: Topology, credits: Credits, standin
) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(10)
    channel = await amqp_connection.channel()
    replies, _ = await _listen(channel, topology)
    before = standin.app.stats.by_model["standin-fail-502"]
    job = {
        "job_id": f"job-{uuid.uuid4().hex[:8]}",
        "user_id": user,
        "operation": "chat.completions",
        "request": {"model": "standin-fail-502", "messages": [{"role": "user", "content": "x"}]},
    }
    await _send(channel, topology, orjson.dumps(job), replies.name, "c")
    body = orjson.loads((await _get(replies)).body)
    assert body["event_type"] == "ai.job.failed"
    assert body["error"]["code"] == "upstream_error" and body["credits_charged"] == 0
    assert standin.app.stats.by_model["standin-fail-502"] - before == proxy.settings.worker_max_attempts
    await credits.settled(user, 10, usage_total=0)
    # A 4xx fails at once.
    job = {
        **job,
        "job_id": f"job-{uuid.uuid4().hex[:8]}",
        "request": {"model": "standin-fail-400", "messages": [{"role": "user", "content": "x"}]},
    }
    await _send(channel, topology, orjson.dumps(job), replies.name, "d")
    body = orjson.loads((await _get(replies)).body)
    assert body["event_type"] == "ai.job.failed" and body["error"]["code"] == "invalid_request"
    await credits.settled(user, 10, usage_total=0)
    await channel.close()


async def test_garbage_is_dead_lettered(proxy, amqp_connection, topology: Topology) -> None:  # type: ignore[no-untyped-def]
    channel = await amqp_connection.channel()
    marker = uuid.uuid4().hex.encode()
    await _send(channel, topology, b"not json " + marker)
    dead = await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )

    async def found() -> bool:
        while True:
            message = await dead.get(fail=False)
            if message is None:
                return False
            await message.ack()
            if marker in message.body:
                return True

    await eventually(found, timeout=20)
    await channel.close()
