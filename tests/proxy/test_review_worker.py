"""The ai.requests worker against the money rules of docs/messages.md, AI jobs: a job is never served free after an
earlier delivery released its hold, one job_id sent for two users is charged to and answered for
each, and a job_id of any length the job schema accepts can be charged."""

from __future__ import annotations

import uuid

import orjson

from shared.broker import Topology
from tests.proxy.conftest import INTERNAL, Credits
from tests.proxy.test_worker import _get, _listen, _send


def _job(user: str, job_id: str | None = None) -> dict[str, object]:
    return {
        "job_id": job_id or f"job-{uuid.uuid4().hex[:8]}",
        "user_id": user,
        "operation": "chat.completions",
        "request": {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]},
    }


async def test_redelivery_after_a_released_hold_is_charged_not_served_free(
    proxy, amqp_connection, topology: Topology, credits: Credits
) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(10)
    job = _job(user)
    # An earlier delivery held the job's price and released it (upstream failed), then died before
    # acknowledging the message, which is now delivered again.
    r = await credits.http.post(
        "/v1/reservations",
        json={"user_id": user, "amount": 1, "idempotency_key": f"job:{job['job_id']}"},
        headers=INTERNAL,
    )
    assert r.status_code == 201, r.text
    r = await credits.http.post(f"/v1/reservations/{r.json()['reservation_id']}/release", headers=INTERNAL)
    assert r.status_code == 200, r.text
    await credits.settled(user, 10, usage_total=0)

    channel = await amqp_connection.channel()
    replies, _ = await _listen(channel, topology)
    await _send(channel, topology, orjson.dumps(job), replies.name, "c1")
    body = orjson.loads((await _get(replies)).body)
    assert body["event_type"] == "ai.job.completed", body
    assert body["response"]["object"] == "chat.completion"
    # Served, so charged: one credit, one usage row.
    assert body["credits_charged"] == 1, body
    await credits.settled(user, 9, usage_total=1)
    # Delivered once more: answered again, still charged once.
    await _send(channel, topology, orjson.dumps(job), replies.name, "c2")
    again = orjson.loads((await _get(replies)).body)
    assert again["credits_charged"] == 1 and again["event_id"] == body["event_id"]
    await credits.settled(user, 9, usage_total=1)
    await channel.close()


async def test_one_job_id_for_two_users_answers_and_charges_each(
    proxy, amqp_connection, topology: Topology, credits: Credits
) -> None:  # type: ignore[no-untyped-def]
    alice, bob = await credits.user(10), await credits.user(10)
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    channel = await amqp_connection.channel()
    replies, _ = await _listen(channel, topology)
    await _send(channel, topology, orjson.dumps(_job(alice, job_id)), replies.name, "a")
    first = orjson.loads((await _get(replies)).body)
    assert first["user_id"] == alice and first["credits_charged"] == 1
    await credits.settled(alice, 9, usage_total=1)

    await _send(channel, topology, orjson.dumps(_job(bob, job_id)), replies.name, "b")
    second = orjson.loads((await _get(replies)).body)
    # Bob's requester must not receive Alice's answer (her user_id, her response) for free.
    assert second["user_id"] == bob, second
    assert second["event_id"] != first["event_id"]
    assert second["credits_charged"] == 1
    await credits.settled(bob, 9, usage_total=1)
    await credits.settled(alice, 9, usage_total=1)
    await channel.close()


async def test_a_job_id_of_the_longest_accepted_length_is_served_and_charged_once(
    proxy, amqp_connection, topology: Topology, credits: Credits
) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(10)
    job = _job(user, "j" * 200)  # AiJobRequest accepts up to 200 characters
    channel = await amqp_connection.channel()
    replies, _ = await _listen(channel, topology)
    await _send(channel, topology, orjson.dumps(job), replies.name, "l1")
    body = orjson.loads((await _get(replies)).body)
    assert body["event_type"] == "ai.job.completed", body
    assert body["credits_charged"] == 1
    await credits.settled(user, 9, usage_total=1)
    await channel.close()
