"""Reserve / commit / release through the HTTP API, with their effects on PostgreSQL and Redis."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import eventually
from tests.credits.helpers import Checker, assert_envelope
from tests.support.credits_service import CreditsService


async def new_user(client: httpx.AsyncClient, user_id: str) -> None:
    r = await client.post("/v1/users", json={"user_id": user_id})
    assert r.status_code == 201, r.text


async def reserve(client: httpx.AsyncClient, user_id: str, amount: int, **extra: object) -> httpx.Response:
    return await client.post("/v1/reservations", json={"user_id": user_id, "amount": amount, **extra})


async def test_reserve_then_partial_commit_returns_the_rest(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await new_user(client, user_id)
    r = await reserve(client, user_id, 4)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["user_id"] == user_id and body["amount"] == 4 and body["credits_remaining"] == 6
    assert body["expires_at"]
    rid = body["reservation_id"]
    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    assert acct["credits_remaining"] == 6 and acct["credits_reserved"] == 4

    r = await client.post(f"/v1/reservations/{rid}/commit", json={"amount": 3})
    assert r.json() == {"reservation_id": rid, "charged": 3, "refunded": 1, "credits_remaining": 7}
    # Repeating the commit (even with another amount) returns the same result and charges nothing more.
    again = await client.post(f"/v1/reservations/{rid}/commit", json={"amount": 1})
    assert again.status_code == 200 and again.json() == r.json()
    assert_envelope(await client.post(f"/v1/reservations/{rid}/release"), 409, "conflict")

    s = await check.consistent(user_id, client)
    assert [(e["type"], e["amount"], e["reference"]) for e in s["ledger"]] == [
        ("signup_bonus", 10, f"signup:{user_id}"),
        ("usage", -3, f"reservation:{rid}:commit"),
    ]
    assert s["account"]["credits_lifetime_used"] == 3


async def test_full_commit_by_default_and_release_is_a_noop_when_repeated(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await new_user(client, user_id)
    a = (await reserve(client, user_id, 2)).json()["reservation_id"]
    b = (await reserve(client, user_id, 5)).json()["reservation_id"]
    r = await client.post(f"/v1/reservations/{a}/commit")
    assert r.json()["charged"] == 2 and r.json()["refunded"] == 0 and r.json()["credits_remaining"] == 3
    r = await client.post(f"/v1/reservations/{b}/release")
    assert r.status_code == 200 and r.json() == {"reservation_id": b, "refunded": 5, "credits_remaining": 8}
    r2 = await client.post(f"/v1/reservations/{b}/release")
    assert r2.status_code == 200 and r2.json() == r.json()
    assert_envelope(await client.post(f"/v1/reservations/{b}/commit"), 409, "conflict")
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 8
    assert [h["status"] for h in s["holds"]] == ["committed", "released"]


async def test_same_idempotency_key_returns_the_same_reservation(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await new_user(client, user_id)
    results = await asyncio.gather(*(reserve(client, user_id, 3, idempotency_key="req-1") for _ in range(20)))
    ids = {r.json()["reservation_id"] for r in results}
    assert all(r.status_code == 201 for r in results) and len(ids) == 1
    (rid,) = ids
    await client.post(f"/v1/reservations/{rid}/commit")
    # After the commit the key still names that reservation; nothing new is held.
    r = await reserve(client, user_id, 3, idempotency_key="req-1")
    assert r.status_code == 201 and r.json()["reservation_id"] == rid
    s = await check.consistent(user_id, client)
    assert len(s["holds"]) == 1 and s["account"]["balance"] == 7


async def test_insufficient_credits(client: httpx.AsyncClient, check: Checker, user_id: str) -> None:
    await new_user(client, user_id)
    assert_envelope(await reserve(client, user_id, 11), 402, "insufficient_credits")
    assert (await reserve(client, user_id, 10)).status_code == 201
    assert_envelope(await reserve(client, user_id, 1), 402, "insufficient_credits")
    s = await check.consistent(user_id, client)
    assert len(s["holds"]) == 1


@pytest.mark.both_redis
async def test_500_concurrent_reservations_against_10_credits(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await new_user(client, user_id)
    results = await asyncio.gather(*(reserve(client, user_id, 1) for _ in range(500)))
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == 10, sorted(set(statuses))
    assert statuses.count(402) == 490
    for r in results:
        if r.status_code == 402:
            assert r.json()["error"]["code"] == "insufficient_credits"
    held = [r.json()["reservation_id"] for r in results if r.status_code == 201]
    assert len(set(held)) == 10
    s = await check.consistent(user_id, client)
    assert len([h for h in s["holds"] if h["status"] == "held"]) == 10
    commits = await asyncio.gather(*(client.post(f"/v1/reservations/{rid}/commit") for rid in held))
    assert all(c.status_code == 200 for c in commits)
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 0
    assert sum(e["amount"] for e in s["ledger"] if e["type"] == "usage") == -10
    assert (await client.get(f"/v1/users/{user_id}/credits")).json()["credits_remaining"] == 0


@pytest.mark.both_redis
async def test_expired_hold_is_returned_and_cannot_be_committed(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await new_user(client, user_id)
    r = await reserve(client, user_id, 6, ttl_seconds=1)
    rid = r.json()["reservation_id"]
    assert r.json()["credits_remaining"] == 4

    async def returned() -> bool:
        acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
        return bool(acct["credits_remaining"] == 10)

    await eventually(returned, timeout=20)
    s = await check.consistent(user_id, client)
    assert [h["status"] for h in s["holds"]] == ["expired"]
    assert_envelope(await client.post(f"/v1/reservations/{rid}/commit"), 409, "conflict")
    # Releasing an expired hold changes nothing.
    assert (await client.post(f"/v1/reservations/{rid}/release")).status_code == 200
    assert (await check.consistent(user_id, client))["account"]["balance"] == 10


async def test_unknown_reservation_and_user(client: httpx.AsyncClient, credits: CreditsService) -> None:
    assert_envelope(await reserve(client, "nobody-here", 1), 404, "not_found")
    missing = "00000000-0000-0000-0000-000000000000"
    assert_envelope(await client.post(f"/v1/reservations/{missing}/commit"), 404, "not_found")
    assert_envelope(await client.post(f"/v1/reservations/{missing}/release"), 404, "not_found")
    assert_envelope(await client.post("/v1/reservations/not-a-uuid/commit"), 404, "not_found")


async def test_metrics_label_requests_by_route_template(client: httpx.AsyncClient, user_id: str) -> None:
    await new_user(client, user_id)
    rid = (await reserve(client, user_id, 1)).json()["reservation_id"]
    await client.post(f"/v1/reservations/{rid}/commit")
    text = (await client.get("/metrics")).text
    assert 'route="/v1/reservations/{reservation_id}/commit"' in text
    assert rid not in text  # one series per route, not per reservation
    assert "credits_reserved_total" in text and "credits_committed_total" in text


async def test_get_reservation_shows_its_state(client: httpx.AsyncClient, user_id: str) -> None:
    await new_user(client, user_id)
    rid = (await reserve(client, user_id, 3)).json()["reservation_id"]
    r = await client.get(f"/v1/reservations/{rid}")
    assert r.json()["status"] == "held" and r.json()["amount"] == 3 and r.json()["charged"] is None
    await client.post(f"/v1/reservations/{rid}/commit", json={"amount": 2})
    r = await client.get(f"/v1/reservations/{rid}")
    assert r.json()["status"] == "committed" and r.json()["charged"] == 2
    # Reservation ids are UUIDs in any spelling; the answer uses the canonical one.
    upper = await client.post(f"/v1/reservations/{rid.upper()}/commit")
    assert upper.status_code == 200 and upper.json()["reservation_id"] == rid and upper.json()["charged"] == 2
