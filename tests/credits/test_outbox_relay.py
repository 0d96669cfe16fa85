"""Credits' events go out through the shared relay (shared/outbox.py), as billing's do: while the
broker is unreachable a `credits.balance.low` written by the hot path waits in the outbox, the relay
backs off and credits' /readyz says so; once the broker is back the event goes out, once."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Callable

import aio_pika
import httpx
import orjson
import pytest

from shared.broker import Topology, declare_topology
from shared.outbox import OutboxRelay
from tests.conftest import eventually
from tests.support.credits_service import running_credits
from tests.support.servers import free_port


async def test_balance_low_waits_out_a_broker_outage_in_the_outbox(
    make_database_url: Callable[[str], str],
    redis_url: str,
    broker_namespace: str,
    rabbitmq_url: str,
    topology: Topology,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user_id = f"u-{uuid.uuid4().hex[:12]}"
    low: list[dict[str, object]] = []

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = orjson.loads(message.body)
        if body.get("user_id") == user_id:
            low.append(body)

    channel = await amqp_connection.channel()
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(await declare_topology(channel, topology), routing_key="credits.balance.low")
    await queue.consume(on_message, no_ack=True)
    async with (
        running_credits(
            database_url=make_database_url("credits_outbox_relay"),
            redis_url=redis_url,
            broker_namespace=broker_namespace,
            run_consumer=False,
        ) as service,
        httpx.AsyncClient(base_url=service.url, headers=service.headers, timeout=30) as client,
    ):
        relay: OutboxRelay = service.app.state.runtime.relay

        async def readiness() -> dict[str, str]:
            return dict((await client.get("/readyz")).json()["checks"])

        async def outbox_ready() -> bool:
            return (await readiness())["outbox"] == "ok"

        async def none_pending() -> bool:
            return (await relay.pending())[0] == 0

        await eventually(outbox_ready, timeout=10)
        relay.set_broker_url(f"amqp://guest:guest@127.0.0.1:{free_port()}/")  # nothing listens there
        await eventually(lambda: relay.last_error and "Connect" in relay.last_error, timeout=10)
        answer = await client.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["checks"]["outbox"].startswith("failing")
        assert answer.json()["checks"]["broker"] == "ok"  # the service's own connection is fine

        # 10 signup credits minus 6 committed: 4, under the threshold of 5.
        assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
        r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 6})
        assert r.status_code == 201, r.text
        commit = await client.post(f"/v1/reservations/{r.json()['reservation_id']}/commit")
        assert commit.status_code == 200, commit.text
        await asyncio.sleep(1.5)
        count, age = await relay.pending()
        assert count == 1 and age >= 1.0
        assert low == []
        # Backing off, not retrying at a fixed pace (the relay that credits had before did, every second).
        delays = [
            float(m[1]) for r in caplog.records if (m := re.search(r"retrying in ([\d.]+)s", r.getMessage()))
        ]
        assert delays[:3] == [0.2, 0.4, 0.8]

        relay.set_broker_url(rabbitmq_url)
        await eventually(lambda: low, timeout=30)
        await eventually(none_pending, timeout=10)
        await eventually(outbox_ready, timeout=10)
    await asyncio.sleep(0.5)
    assert [(e["credits_remaining"], e["threshold"]) for e in low] == [(4, 5)]
    await channel.close()
