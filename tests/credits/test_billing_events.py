"""billing.pack.purchased / billing.pack.refunded → the ledger, exactly once; events credits publishes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
import orjson
import pytest

from shared.broker import Topology, declare_topology
from shared.events import PackPurchased, PackRefunded
from tests.conftest import eventually
from tests.credits.helpers import Checker
from tests.support.credits_service import CreditsService


@dataclass
class Bus:
    exchange: aio_pika.abc.AbstractExchange
    channel: aio_pika.abc.AbstractChannel
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    request_ids: dict[str, str] = field(default_factory=dict)  # event_id → x-request-id header

    async def publish(
        self,
        body: bytes | dict[str, Any],
        routing_key: str,
        message_id: str | None = None,
        request_id: str | None = None,
    ) -> None:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        await self.exchange.publish(
            aio_pika.Message(
                raw,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message_id or uuid.uuid4().hex,
                type=routing_key,
                headers={"x-request-id": request_id} if request_id else None,
            ),
            routing_key=routing_key,
        )

    def events(self, routing_key: str, user_id: str) -> list[dict[str, Any]]:
        return [b for k, b in self.seen if k == routing_key and b.get("user_id") == user_id]


@pytest.fixture(scope="module")
async def bus(
    credits: CreditsService, amqp_connection: aio_pika.abc.AbstractRobustConnection, topology: Topology
) -> AsyncIterator[Bus]:
    channel = await amqp_connection.channel(publisher_confirms=True)
    exchange = await declare_topology(channel, topology)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key="credits.#")
    bus = Bus(exchange, channel)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            body = orjson.loads(message.body)
            bus.seen.append((message.routing_key or "", body))
            rid = (message.headers or {}).get("x-request-id")
            if isinstance(rid, str):
                bus.request_ids[str(body.get("event_id"))] = rid

    await queue.consume(on_message)
    yield bus
    await channel.close()


def purchase(
    user_id: str, credits: int = 100, pack: str = "starter", unlocks_api: bool = False, **kw: Any
) -> PackPurchased:
    return PackPurchased(
        purchase_id=kw.pop("purchase_id", f"pur_{uuid.uuid4().hex[:10]}"),
        user_id=user_id,
        pack=pack,
        credits=credits,
        unlocks_api=unlocks_api,
        amount_cents=kw.pop("amount_cents", 500),
        currency="usd",
        stripe_checkout_session_id="cs_test_1",
    )


async def credited(client: httpx.AsyncClient, user_id: str, expected: int) -> None:
    async def check() -> bool:
        r = await client.get(f"/v1/users/{user_id}/credits")
        return r.status_code == 200 and r.json()["credits_remaining"] == expected

    await eventually(check, timeout=20)


async def test_purchase_published_three_times_is_credited_once(
    bus: Bus, client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    event = purchase(user_id, credits=100)
    for _ in range(3):
        await bus.publish(event.body(), event.routing_key, str(event.event_id))
    # The same purchase again, three more times at once, as a new event id (billing retried the outbox).
    again = purchase(user_id, credits=100, purchase_id=event.purchase_id)
    await asyncio.gather(*(bus.publish(again.body(), again.routing_key) for _ in range(3)))
    await credited(client, user_id, 110)  # signup credits + the pack, once
    await eventually(lambda: bus.events("credits.purchase.applied", user_id), timeout=20)
    await asyncio.sleep(1.0)  # give duplicates time to (wrongly) land
    s = await check.consistent(user_id, client)
    assert [(e["type"], e["amount"]) for e in s["ledger"]] == [("signup_bonus", 10), ("purchase", 100)]
    assert s["ledger"][1]["reference"] == f"purchase:{event.purchase_id}"
    applied = bus.events("credits.purchase.applied", user_id)
    assert len(applied) == 1
    assert applied[0]["purchase_id"] == event.purchase_id and applied[0]["credits"] == 100
    assert applied[0]["credits_remaining"] == 110
    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    assert acct["tier"] == "starter" and acct["credits_purchased_total"] == 100
    assert acct["last_purchase_amount"] == 100 and acct["last_purchase_date"]


async def test_concurrent_duplicates_across_users_and_unlock_once(
    bus: Bus, client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    first = purchase(user_id, credits=1200, pack="pro", unlocks_api=True, amount_cents=3000)
    second = purchase(user_id, credits=5000, pack="business", unlocks_api=True, amount_cents=10000)
    await asyncio.gather(
        *(bus.publish(first.body(), first.routing_key) for _ in range(3)),
        *(bus.publish(second.body(), second.routing_key) for _ in range(3)),
    )
    await credited(client, user_id, 10 + 1200 + 5000)
    await eventually(lambda: len(bus.events("credits.purchase.applied", user_id)) == 2, timeout=20)
    await asyncio.sleep(1.0)
    unlocked = bus.events("credits.api_access.unlocked", user_id)
    assert len(unlocked) == 1 and unlocked[0]["purchase_id"] in {first.purchase_id, second.purchase_id}
    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    assert acct["api_access_unlocked"] is True and acct["tier"] == "business"
    assert acct["support_tier"] == "Dedicated (12h response)"
    s = await check.consistent(user_id, client)
    assert len(s["purchases"]) == 2


async def test_garbage_is_dead_lettered_and_the_next_message_applied(
    bus: Bus,
    client: httpx.AsyncClient,
    check: Checker,
    user_id: str,
    amqp_connection: aio_pika.abc.AbstractRobustConnection,
    topology: Topology,
) -> None:
    channel = await amqp_connection.channel()
    dead = await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    marker = uuid.uuid4().hex
    await bus.publish(
        b"this is not json " + marker.encode(), "billing.pack.purchased", message_id=f"garbage-{marker}"
    )
    bad = purchase(user_id, credits=50).body()
    bad["credits"] = -5
    await bus.publish(bad, "billing.pack.purchased", message_id=f"invalid-{marker}")
    good = purchase(user_id, credits=50)
    await bus.publish(good.body(), good.routing_key)
    await credited(client, user_id, 60)

    found: set[str] = set()

    async def dead_lettered() -> bool:
        while True:
            message = await dead.get(no_ack=False, fail=False)
            if message is None:
                break
            if (message.message_id or "").endswith(marker):
                found.add(message.message_id or "")
                await message.ack()
            else:
                await message.nack(requeue=True)
                break
        return found == {f"garbage-{marker}", f"invalid-{marker}"}

    await eventually(dead_lettered, timeout=20)
    await channel.close()
    s = await check.consistent(user_id, client)
    assert [e["type"] for e in s["ledger"]] == ["signup_bonus", "purchase"]


async def test_refund_claws_back_cumulatively_and_records_debt(
    bus: Bus, client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    bought = purchase(user_id, credits=100)
    await bus.publish(bought.body(), bought.routing_key)
    await credited(client, user_id, 110)
    # Spend 80 of the 110, then refund 40, then (cumulatively) all 100 of the pack.
    r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 80})
    await client.post(f"/v1/reservations/{r.json()['reservation_id']}/commit")

    def refund(cumulative: int) -> PackRefunded:
        return PackRefunded(
            purchase_id=bought.purchase_id,
            user_id=user_id,
            pack="starter",
            credits=cumulative,
            amount_cents=cumulative * 5,
            currency="usd",
        )

    for _ in range(2):  # a replay changes nothing
        await bus.publish(refund(40).body(), "billing.pack.refunded")
    await credited(client, user_id, 0)
    await asyncio.sleep(0.5)
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 0 and s["account"]["credits_owed"] == 10
    await bus.publish(refund(100).body(), "billing.pack.refunded")
    await bus.publish(refund(40).body(), "billing.pack.refunded")  # stale and late: ignored

    async def owed() -> bool:
        st = await check.state(user_id)
        return bool(st["account"]["credits_owed"] == 70)

    await eventually(owed, timeout=20)
    s = await check.consistent(user_id, client)
    clawbacks = [e for e in s["ledger"] if e["type"] == "refund_clawback"]
    assert [e["amount"] for e in clawbacks] == [-30]
    assert clawbacks[0]["reference"] == f"refund:{bought.purchase_id}:40"
    assert s["purchases"][0]["refunded_credits"] == 100
    # A later purchase pays the debt first.
    later = purchase(user_id, credits=100)
    await bus.publish(later.body(), later.routing_key)
    await credited(client, user_id, 30)
    s = await check.consistent(user_id, client)
    assert s["account"]["credits_owed"] == 0
    assert s["ledger"][-1]["type"] == "refund_clawback" and s["ledger"][-1]["amount"] == -70


async def test_balance_low_published_once_per_crossing(
    bus: Bus, client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201

    async def spend(n: int) -> None:
        r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": n})
        assert r.status_code == 201, r.text
        await client.post(f"/v1/reservations/{r.json()['reservation_id']}/commit")

    await spend(4)  # 10 → 6: above the threshold of 5
    await spend(2)  # 6 → 4: crosses
    await spend(1)  # 4 → 3: still low, no new event
    await eventually(lambda: bus.events("credits.balance.low", user_id), timeout=20)
    await asyncio.sleep(0.5)
    low = bus.events("credits.balance.low", user_id)
    assert len(low) == 1 and low[0]["credits_remaining"] == 4 and low[0]["threshold"] == 5
    # Rising above the threshold re-arms it; the next downward crossing publishes again.
    event = purchase(user_id, credits=10)
    await bus.publish(event.body(), event.routing_key)
    await credited(client, user_id, 13)
    await spend(9)  # 13 → 4
    await eventually(lambda: len(bus.events("credits.balance.low", user_id)) == 2, timeout=20)
    await check.consistent(user_id, client)


async def test_request_id_follows_a_purchase_into_the_events_it_causes(
    bus: Bus, client: httpx.AsyncClient, user_id: str
) -> None:
    event = purchase(user_id, credits=100, pack="pro", unlocks_api=True)
    await bus.publish(event.body(), event.routing_key, str(event.event_id), request_id="trace-from-billing")
    await credited(client, user_id, 110)
    await eventually(lambda: bus.events("credits.api_access.unlocked", user_id), timeout=20)
    applied = await eventually(lambda: bus.events("credits.purchase.applied", user_id), timeout=20)
    unlocked = bus.events("credits.api_access.unlocked", user_id)
    for published in (*applied, *unlocked):  # type: ignore[misc]
        assert bus.request_ids[published["event_id"]] == "trace-from-billing"
