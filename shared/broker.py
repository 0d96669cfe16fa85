"""RabbitMQ plumbing on aio-pika: robust connection, topology, confirmed publishing, safe consuming.

Topology (docs/messages.md): a durable topic exchange for events, a fanout dead-letter exchange and its
durable queue. Work queues are quorum queues that dead-letter to the DLX; a consumer rejects a
poison message without requeue (so it lands in the dead-letter queue at once) and requeues a
message that failed for a passing reason, which the queue's delivery limit bounds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from shared.events import Event
from shared.logs import REQUEST_ID_HEADER, current_request_id, new_request_id, request_id_var
from shared.metrics import AMQP_CONSUMED, AMQP_PUBLISHED, AMQP_REDELIVERED

log = logging.getLogger("shared.broker")

EVENTS_EXCHANGE = "credit_proxy.events"
DEAD_LETTER_EXCHANGE = "credit_proxy.dlx"
DEAD_LETTER_QUEUE = "credit_proxy.dead_letters"
DELIVERY_LIMIT = 5


class PoisonMessage(Exception):
    """The message can never be processed (malformed, invalid); it goes straight to the DLQ."""


@dataclass(frozen=True)
class Topology:
    namespace: str = ""

    def name(self, base: str) -> str:
        return f"{base}.{self.namespace}" if self.namespace else base

    @property
    def events_exchange(self) -> str:
        return self.name(EVENTS_EXCHANGE)

    @property
    def dead_letter_exchange(self) -> str:
        return self.name(DEAD_LETTER_EXCHANGE)

    @property
    def dead_letter_queue(self) -> str:
        return self.name(DEAD_LETTER_QUEUE)


async def connect(url: str, name: str) -> AbstractRobustConnection:
    return await aio_pika.connect_robust(url, client_properties={"connection_name": name}, timeout=10)


async def declare_topology(channel: AbstractChannel, topology: Topology) -> AbstractExchange:
    events = await channel.declare_exchange(
        topology.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dlx = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead = await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dlx)
    return events


def work_queue_arguments(topology: Topology) -> dict[str, Any]:
    """Arguments of every work queue; deploy/rabbitmq/definitions.json must declare the same ones.

    Dead letters at least once: a quorum queue keeps a dead-lettered message until the dead-letter
    queue has confirmed it (the default, at-most-once, drops it if that queue is unavailable just
    then). RabbitMQ applies the strategy only with `x-overflow: reject-publish`."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": topology.dead_letter_exchange,
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


# The same two settings as a policy, for queues declared before them (a queue's arguments cannot
# change, and declaring it with others fails with PRECONDITION_FAILED). deploy/rabbitmq/definitions.json
# carries it; elsewhere: rabbitmqctl set_policy --apply-to queues <name> '<pattern>' '<definition>'.
DEAD_LETTER_POLICY_NAME = "credit-proxy-dead-letters-at-least-once"
DEAD_LETTER_POLICY_PATTERN = r"^(credits\.billing-events|ai\.requests)(\..+)?$"
DEAD_LETTER_POLICY = {"dead-letter-strategy": "at-least-once", "overflow": "reject-publish"}


async def declare_work_queue(
    channel: AbstractChannel, topology: Topology, name: str, routing_keys: Sequence[str] = ()
) -> AbstractQueue:
    queue = await channel.declare_queue(
        topology.name(name), durable=True, arguments=work_queue_arguments(topology)
    )
    for key in routing_keys:
        await queue.bind(topology.events_exchange, routing_key=key)
    return queue


async def _declare_or_adopt_work_queue(
    connection: AbstractRobustConnection,
    topology: Topology,
    name: str,
    routing_keys: Sequence[str],
    prefetch: int,
) -> tuple[AbstractChannel, AbstractQueue]:
    """Declares the work queue; one declared earlier with other arguments (before at-least-once
    dead-lettering) is used as it is, with an error in the log naming the policy that gives it the
    new settings without a redeclare (the broker closed the first channel on PRECONDITION_FAILED)."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    await declare_topology(channel, topology)
    try:
        return channel, await declare_work_queue(channel, topology, name, routing_keys)
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        log.error(
            "queue %s exists with other arguments (%s); using it as it is. Dead letters are at least "
            "once only under the policy: rabbitmqctl set_policy --apply-to queues %s '%s' '%s'",
            topology.name(name),
            exc,
            DEAD_LETTER_POLICY_NAME,
            DEAD_LETTER_POLICY_PATTERN,
            orjson.dumps(DEAD_LETTER_POLICY).decode(),
        )
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(topology.name(name), passive=True)
    for key in routing_keys:
        await queue.bind(topology.events_exchange, routing_key=key)
    return channel, queue


def build_message(body: bytes, *, message_id: str, type_: str, **props: Any) -> aio_pika.Message:
    headers = dict(props.pop("headers", None) or {})
    headers.setdefault(REQUEST_ID_HEADER, current_request_id() or new_request_id())
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        type=type_,
        headers=headers,
        **props,
    )


def event_message(event: Event) -> aio_pika.Message:
    return build_message(orjson.dumps(event.body()), message_id=str(event.event_id), type_=event.routing_key)


class Publisher:
    """Publishes on a confirm-mode channel: `publish` returns only once the broker has the message."""

    def __init__(
        self, connection: AbstractRobustConnection, topology: Topology, *, on_return_raises: bool = False
    ) -> None:
        self._connection = connection
        self._topology = topology
        # Messages are published mandatory; with this set, one that no queue takes raises PublishError
        # instead of being confirmed and dropped (for messages that must reach a consumer).
        self._on_return_raises = on_return_raises
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> AbstractExchange:
        if self._exchange is not None and self._channel is not None and not self._channel.is_closed:
            return self._exchange
        async with self._lock:
            if self._exchange is None or self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=self._on_return_raises
                )
                self._exchange = await declare_topology(self._channel, self._topology)
        assert self._exchange is not None
        return self._exchange

    async def publish(self, event: Event) -> None:
        await self.publish_raw(event_message(event), event.routing_key)

    async def publish_raw(self, message: aio_pika.Message, routing_key: str) -> None:
        exchange = await self._ready()
        await exchange.publish(message, routing_key=routing_key, timeout=10)
        AMQP_PUBLISHED.labels(routing_key).inc()

    async def send_to_queue(self, queue_name: str, message: aio_pika.Message) -> None:
        """Publishes through the default exchange, e.g. to a `reply_to` queue."""
        await self._ready()
        assert self._channel is not None
        await self._channel.default_exchange.publish(message, routing_key=queue_name, timeout=10)


Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


def delivery_count(message: AbstractIncomingMessage) -> int:
    value = (message.headers or {}).get("x-delivery-count", 0)
    return int(value) if isinstance(value, int | str) and str(value).isdigit() else 0


async def consume(
    connection: AbstractRobustConnection,
    topology: Topology,
    queue_name: str,
    handler: Handler,
    *,
    routing_keys: Sequence[str] = (),
    prefetch: int = 32,
) -> tuple[AbstractChannel, AbstractQueue, str]:
    """Starts a consumer. Returns (channel, queue, consumer_tag) so the caller can cancel it on shutdown."""
    channel, queue = await _declare_or_adopt_work_queue(
        connection, topology, queue_name, routing_keys, prefetch
    )

    async def on_message(message: AbstractIncomingMessage) -> None:
        rid = (message.headers or {}).get(REQUEST_ID_HEADER)
        token = request_id_var.set(str(rid) if rid else new_request_id())
        if message.redelivered:
            AMQP_REDELIVERED.labels(queue_name).inc()
        try:
            await handler(message)
        except PoisonMessage as exc:
            log.warning("dead-lettering message %s: %s", message.message_id, exc)
            AMQP_CONSUMED.labels(queue_name, "dead_lettered").inc()
            await message.reject(requeue=False)
        except Exception:
            log.exception(
                "message %s failed; requeueing (delivery %d)", message.message_id, delivery_count(message)
            )
            AMQP_CONSUMED.labels(queue_name, "requeued").inc()
            # Back off a little so a dependency outage does not spin the queue; the quorum queue's
            # delivery limit dead-letters a message that keeps failing.
            await asyncio.sleep(min(0.2 * (delivery_count(message) + 1), 2.0))
            await message.nack(requeue=True)
        else:
            if not message.processed:
                await message.ack()
            AMQP_CONSUMED.labels(queue_name, "ok").inc()
        finally:
            request_id_var.reset(token)

    tag = await queue.consume(on_message)
    return channel, queue, tag


def parse_json(message: AbstractIncomingMessage) -> dict[str, Any]:
    try:
        data = orjson.loads(message.body)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise PoisonMessage("body is not a JSON object")
    return data
