"""Billing test fixtures: a fake Stripe server, a billing instance using it, and a message capture."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aio_pika
import asyncpg
import orjson
import pytest
from sqlalchemy.engine import make_url

from shared.broker import Topology, declare_topology
from tests.support.billing_service import RunningBilling, running_billing
from tests.support.servers import REPO_ROOT, serve_app
from tests.support.stripe_server import FakeStripe

# Stripe's published spec and fixtures, vendored in tests/specs (see its README.md).
SPECS_DIR = Path(REPO_ROOT) / "tests" / "specs"


@dataclass
class FakeStripeServer:
    stripe: FakeStripe
    url: str


@pytest.fixture(scope="package")
async def fake_stripe() -> AsyncIterator[FakeStripeServer]:
    stripe = FakeStripe()
    async with serve_app(stripe.app()) as url:
        yield FakeStripeServer(stripe, url)


def billing_on_fake_stripe(name: str, database: str, scope: Literal["module", "package"]) -> Any:
    """A fixture `name`: billing in Stripe mode on a database of its own, its SDK pointed at the fake
    Stripe server."""

    @pytest.fixture(name=name, scope=scope)
    async def running(
        fake_stripe: FakeStripeServer,
        make_database_url: Callable[[str], str],
        rabbitmq_url: str,
        broker_namespace: str,
    ) -> AsyncIterator[RunningBilling]:
        async with running_billing(
            database_url=make_database_url(database),
            rabbitmq_url=rabbitmq_url,
            broker_namespace=broker_namespace,
            stripe_api_base=fake_stripe.url,
            stripe_api_key=fake_stripe.stripe.api_key,
        ) as billing:
            yield billing

    return running


billing = billing_on_fake_stripe("billing", "billing", scope="package")


@dataclass
class Captured:
    """Every message on this run's events exchange with a `billing.#` routing key."""

    messages: list[tuple[str, dict[str, Any], aio_pika.abc.AbstractIncomingMessage]] = field(
        default_factory=list
    )

    def of(self, purchase_id: str, routing_key: str | None = None) -> list[dict[str, Any]]:
        return [
            body
            for key, body, _ in self.messages
            if body.get("purchase_id") == purchase_id and (routing_key is None or key == routing_key)
        ]


@pytest.fixture
async def captured(
    amqp_connection: aio_pika.abc.AbstractRobustConnection, topology: Topology
) -> AsyncIterator[Captured]:
    capture = Captured()
    channel = await amqp_connection.channel()
    exchange = await declare_topology(channel, topology)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key="billing.#")

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        capture.messages.append((message.routing_key or "", orjson.loads(message.body), message))

    tag = await queue.consume(on_message, no_ack=True)
    yield capture
    with contextlib.suppress(Exception):
        await queue.cancel(tag)
    await channel.close()


async def sql(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()
