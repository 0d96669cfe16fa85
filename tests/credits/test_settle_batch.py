"""POST /v1/reservations/batch: many commits/releases in one call, each with the single endpoint's
semantics (idempotent, 409 after the other ending, 404 unknown), delivered any number of times."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from tests.credits.helpers import Checker, assert_envelope


async def _user(client: httpx.AsyncClient, user_id: str) -> None:
    r = await client.post("/v1/users", json={"user_id": user_id})
    assert r.status_code == 201, r.text


async def _hold(client: httpx.AsyncClient, user_id: str, amount: int) -> str:
    r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": amount})
    assert r.status_code == 201, r.text
    return str(r.json()["reservation_id"])


async def test_batch_commits_and_releases_each_item_once_even_when_delivered_again(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await _user(client, user_id)
    a, b, c = [await _hold(client, user_id, n) for n in (3, 2, 4)]  # 10 → 1 available
    items = [
        {"reservation_id": a, "action": "commit", "amount": 2},
        {"reservation_id": b, "action": "commit"},
        {"reservation_id": c, "action": "release"},
    ]
    first = await client.post("/v1/reservations/batch", json={"items": items})
    assert first.status_code == 200, first.text
    results = first.json()["results"]
    assert [r["status"] for r in results] == [200, 200, 200]
    assert results[0] == {
        "status": 200,
        "reservation_id": a,
        "charged": 2,
        "refunded": 1,
        "credits_remaining": results[0]["credits_remaining"],
    }
    assert results[1]["charged"] == 2 and results[1]["refunded"] == 0
    assert results[2]["refunded"] == 4 and "charged" not in results[2]

    # The same batch again (its answer lost, then retried), also concurrently: nothing changes.
    again = await asyncio.gather(
        *(client.post("/v1/reservations/batch", json={"items": items}) for _ in range(3))
    )
    for r in again:
        assert r.status_code == 200, r.text
        assert [(x["status"], x.get("charged"), x["refunded"]) for x in r.json()["results"]] == [
            (200, 2, 1),
            (200, 2, 0),
            (200, None, 4),
        ]
    s = await check.consistent(user_id, client)
    assert sorted((e["type"], e["amount"], e["reference"]) for e in s["ledger"]) == sorted(
        [
            ("signup_bonus", 10, f"signup:{user_id}"),
            ("usage", -2, f"reservation:{a}:commit"),
            ("usage", -2, f"reservation:{b}:commit"),
        ]
    )
    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    assert acct["credits_remaining"] == 6 and acct["credits_reserved"] == 0


async def test_batch_reports_each_items_own_error_and_applies_the_rest(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await _user(client, user_id)
    released, committed, fine, too_small = [await _hold(client, user_id, 2) for _ in range(4)]
    assert (await client.post(f"/v1/reservations/{released}/release")).status_code == 200
    assert (await client.post(f"/v1/reservations/{committed}/commit")).status_code == 200
    unknown = str(uuid.uuid4())
    r = await client.post(
        "/v1/reservations/batch",
        json={
            "items": [
                {"reservation_id": released, "action": "commit", "amount": 1},
                {"reservation_id": committed, "action": "release"},
                {"reservation_id": unknown, "action": "commit"},
                {"reservation_id": too_small, "action": "commit", "amount": 3},
                {"reservation_id": fine, "action": "commit", "amount": 1},
            ]
        },
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["status"], x.get("error", {}).get("code")) for x in results] == [
        (409, "conflict"),
        (409, "conflict"),
        (404, "not_found"),
        (400, "invalid_request"),
        (200, None),
    ]
    assert results[4]["charged"] == 1
    s = await check.consistent(user_id, client)
    assert sorted(e["reference"] for e in s["ledger"] if e["type"] == "usage") == sorted(
        [f"reservation:{committed}:commit", f"reservation:{fine}:commit"]
    )
    assert {str(h["id"]): h["status"] for h in s["holds"]}[too_small] == "held"


async def test_batch_bad_bodies_change_nothing(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    await _user(client, user_id)
    rid = await _hold(client, user_id, 1)
    # A malformed envelope refuses the whole call.
    commit = {"reservation_id": rid, "action": "commit"}
    for body in ({}, {"items": []}, {"items": commit}, {"items": [commit, 1]}, {"items": [commit] * 1001}):
        r = await client.post("/v1/reservations/batch", json=body)
        assert_envelope(r, 422, "invalid_request")
    # A malformed item is refused on its own.
    for item in (
        {"reservation_id": rid, "action": "refund"},
        {"reservation_id": rid, "action": "commit", "amount": -1},
    ):
        r = await client.post("/v1/reservations/batch", json={"items": [item]})
        assert r.status_code == 200, r.text
        [result] = r.json()["results"]
        assert result["reservation_id"] == rid and result["status"] == 422, result
        assert result["error"]["code"] == "invalid_request", result
    no_token = await client.post(
        "/v1/reservations/batch",
        json={"items": [{"reservation_id": rid, "action": "commit"}]},
        headers={"authorization": "Bearer wrong"},
    )
    assert_envelope(no_token, 401, "unauthorized")
    s = await check.consistent(user_id, client)
    assert [h["status"] for h in s["holds"]] == ["held"]
    assert [e["type"] for e in s["ledger"]] == ["signup_bonus"]
