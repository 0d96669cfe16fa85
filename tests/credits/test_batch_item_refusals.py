"""POST /v1/reservations/batch refuses a bad item on its own: the proxy sends every user's settlements
through it, so one malformed item, repeated reservation or invalid user id must not leave the other
users' commits, hold records and extensions unapplied (docs/api.md, Credits)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import httpx

from shared.holds.fast_path import RedisHolds
from tests.credits.helpers import Checker

DETAILS = {"operation": "chat", "model": "m", "input_tokens": 3, "output_tokens": 4, "upstream_cost_usd": 0.5}


async def _users(client: httpx.AsyncClient, n: int) -> list[str]:
    users = [f"u-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    for user in users:
        assert (await client.post("/v1/users", json={"user_id": user})).status_code == 201
    return users


async def _hold(client: httpx.AsyncClient, user_id: str, amount: int, ttl: int = 600) -> str:
    body = {"user_id": user_id, "amount": amount, "ttl_seconds": ttl}
    r = await client.post("/v1/reservations", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["reservation_id"])


async def _batch(client: httpx.AsyncClient, *items: dict[str, Any]) -> list[dict[str, Any]]:
    r = await client.post("/v1/reservations/batch", json={"items": list(items)})
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["results"]
    assert len(results) == len(items), results
    return results


def _refused(result: dict[str, Any], reservation_id: str | None, status: int) -> None:
    assert set(result) == {"reservation_id", "status", "error"}, result
    assert (result["reservation_id"], result["status"]) == (reservation_id, status), result
    assert set(result["error"]) == {"type", "code", "message"}, result
    assert result["error"]["code"] == "invalid_request", result


async def _expires_at(pg: asyncpg.Pool, reservation_id: str) -> Any:
    async with pg.acquire() as conn:
        return await conn.fetchval(
            "SELECT expires_at FROM reservations WHERE id = $1", uuid.UUID(reservation_id)
        )


async def test_one_malformed_item_is_refused_alone_and_other_users_items_apply(
    client: httpx.AsyncClient, check: Checker, pg: asyncpg.Pool, redis_holds: RedisHolds
) -> None:
    committer, recorder, extender, sender_of_bad = await _users(client, 4)
    committed = await _hold(client, committer, 3)
    placed = await redis_holds.place(recorder, 4)
    assert placed is not None
    extended, released = await _hold(client, extender, 2, ttl=30), await _hold(client, extender, 5)
    bad = await _hold(client, sender_of_bad, 2)
    expires_before = await _expires_at(pg, extended)
    bad_before = await check.consistent(sender_of_bad, client)
    deadline_ms = int(time.time() * 1000) + 120_000

    results = await _batch(
        client,
        {"reservation_id": committed, "action": "commit", "amount": 2, "details": DETAILS},
        placed.record(),
        {"reservation_id": bad, "action": "commit", "amount": 1, "details": {**DETAILS, "operation": ""}},
        {"reservation_id": extended, "action": "extend", "deadline_ms": deadline_ms},
        {"reservation_id": released, "action": "release"},
        {"action": "commit", "amount": "1"},  # not even a reservation id
    )

    assert [r["status"] for r in results] == [200, 201, 422, 200, 200, 422], results
    assert (results[0]["charged"], results[0]["refunded"]) == (2, 1)
    assert results[1]["reservation_id"] == placed.reservation_id
    _refused(results[2], bad, 422)
    assert "details.operation" in results[2]["error"]["message"], results[2]
    _refused(results[5], None, 422)
    # The valid items took effect, each for its own user.
    s = await check.consistent(committer, client)
    assert [(h["status"], h["charged"]) for h in s["holds"]] == [("committed", 2)]
    assert s["account"]["balance"] == 8
    [usage] = [e for e in s["ledger"] if e["type"] == "usage"]
    assert (usage["amount"], usage["reference"]) == (-2, f"reservation:{committed}:commit")
    assert usage["details"] is not None and "chat" in str(usage["details"])
    s = await check.consistent(recorder, client)
    assert [(str(h["id"]), h["amount"], h["status"]) for h in s["holds"]] == [
        (placed.reservation_id, 4, "held")
    ]
    s = await check.consistent(extender, client)
    assert {str(h["id"]): h["status"] for h in s["holds"]} == {extended: "held", released: "released"}
    assert s["account"]["balance"] == 10 and [e["type"] for e in s["ledger"]] == ["signup_bonus"]
    expires_after = await _expires_at(pg, extended)
    assert expires_after > expires_before
    assert abs(expires_after.timestamp() * 1000 - deadline_ms) < 1000
    # The bad item changed nothing: its hold is still open and can be committed properly.
    assert await check.consistent(sender_of_bad, client) == bad_before
    [fixed] = await _batch(client, {"reservation_id": bad, "action": "commit", "amount": 1})
    assert (fixed["status"], fixed["charged"]) == (200, 1)


async def test_a_repeated_reservation_applies_its_first_item_only(
    client: httpx.AsyncClient, check: Checker
) -> None:
    (user,) = await _users(client, 1)
    twice, other, first_bad = [await _hold(client, user, 2) for _ in range(3)]

    results = await _batch(
        client,
        {"reservation_id": twice, "action": "commit", "amount": 1},
        {"reservation_id": other, "action": "commit", "amount": 2},
        {"reservation_id": twice, "action": "release"},
        {"reservation_id": first_bad, "action": "commit", "amount": -1},
        {"reservation_id": first_bad, "action": "commit", "amount": 1},
    )

    assert [r["status"] for r in results] == [200, 200, 400, 422, 400], results
    _refused(results[2], twice, 400)
    assert "at most once per batch" in results[2]["error"]["message"]
    _refused(results[3], first_bad, 422)
    _refused(results[4], first_bad, 400)  # the first item for it was refused: so is the repeat
    s = await check.consistent(user, client)
    assert {str(h["id"]): (h["status"], h["charged"]) for h in s["holds"]} == {
        twice: ("committed", 1),
        other: ("committed", 2),
        first_bad: ("held", None),
    }
    assert sorted(e["amount"] for e in s["ledger"]) == [-2, -1, 10]
    assert s["account"]["balance"] == 7


async def test_a_hold_for_an_invalid_user_id_is_refused_alone(
    client: httpx.AsyncClient, check: Checker, redis_holds: RedisHolds
) -> None:
    recorder, committer = await _users(client, 2)
    placed = await redis_holds.place(recorder, 3)
    assert placed is not None
    committed = await _hold(client, committer, 4)
    invalid = {**placed.record(), "reservation_id": str(uuid.uuid4()), "user_id": "bad\x01user"}

    results = await _batch(
        client,
        invalid,
        placed.record(),
        {"reservation_id": committed, "action": "commit"},
    )

    assert [r["status"] for r in results] == [400, 201, 200], results
    _refused(results[0], invalid["reservation_id"], 400)
    assert "user_id" in results[0]["error"]["message"]
    async with check.pg.acquire() as conn:
        assert not await conn.fetchval(
            "SELECT count(*) FROM reservations WHERE id = $1", uuid.UUID(invalid["reservation_id"])
        )
    s = await check.consistent(recorder, client)
    assert [(str(h["id"]), h["status"]) for h in s["holds"]] == [(placed.reservation_id, "held")]
    s = await check.consistent(committer, client)
    assert [(h["status"], h["charged"]) for h in s["holds"]] == [("committed", 4)]
    assert s["account"]["balance"] == 6
