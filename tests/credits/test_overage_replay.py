"""A commit's overage is charged once however often the commit is delivered, even when the credits
process died after the commit's transaction and before the overage was charged: the commit delivered
again (the proxy's retry, or the entry it parked in Redis) finds it committed (a replay) and charges
the overage then, once (docs/api.md, the commit's `overage`; docs/outages.md).

The process dying is simulated in process: the overage step raises (not an AppError) the first time,
before it places its own hold, so the call fails after the commit's transaction."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import pytest

from services.credits.reservations import Reservations
from shared.holds.fast_path import RedisHolds
from tests.conftest import eventually
from tests.credits.helpers import Checker
from tests.support.credits_service import CreditsService


class ProcessDied(Exception):
    """Stands for the process ending where it is raised (SIGKILL, OOM, a deploy)."""


def _die_once_in_the_overage(credits: CreditsService, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The next overage hold raises instead of being placed; returns the list it appends to then."""
    reservations: Reservations = credits.app.state.runtime.settlements.reservations
    place = reservations.reserve
    died: list[str] = []

    async def reserve(user_id: str, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("kind") == "overage" and not died:
            died.append(user_id)
            raise ProcessDied("killed between the commit and its overage")
        return await place(user_id, *args, **kwargs)

    monkeypatch.setattr(reservations, "reserve", reserve)
    return died


async def _hold(client: httpx.AsyncClient, user_id: str, amount: int) -> str:
    r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": amount})
    assert r.status_code == 201, r.text
    return str(r.json()["reservation_id"])


async def _batch(client: httpx.AsyncClient, item: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/v1/reservations/batch", json={"items": [item]})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert isinstance(result, dict)
    return result


async def _totals(
    check: Checker, pg: asyncpg.Pool, client: httpx.AsyncClient, user_id: str
) -> dict[str, Any]:
    s = await check.consistent(user_id, client)
    account = s["account"]
    charges = await pg.fetch(
        "SELECT reservation_id::text AS rid, credits, taken, owed FROM overage_charges WHERE user_id = $1",
        user_id,
    )
    return {
        "balance": account["balance"],
        "owed": account["credits_owed"],
        "used": account["credits_lifetime_used"],
        "usage": sorted(-e["amount"] for e in s["ledger"] if e["type"] == "usage"),
        "overage_entries": [e["reference"] for e in s["ledger"] if e["reference"].endswith(":overage")],
        "charges": [tuple(r) for r in charges],
    }


async def _deliver_again(
    via: str, client: httpx.AsyncClient, redis_holds: RedisHolds, user_id: str, item: dict[str, Any]
) -> dict[str, Any] | None:
    """The commit delivered again as the proxy would: retried over HTTP, or parked in credits' Redis
    (applied by `PendingSettlements.drain_pending`). Returns the batch result (None when parked)."""
    if via == "batch":
        return await _batch(client, item)
    before = (await client.get(f"/v1/users/{user_id}/credits")).json()
    await redis_holds.park(user_id, [(item["reservation_id"], item)])

    async def applied() -> bool:
        now = (await client.get(f"/v1/users/{user_id}/credits")).json()
        return bool(now != before)

    await eventually(applied, timeout=15)
    return None


@pytest.mark.parametrize("via", ["batch", "parked"])
async def test_an_overage_left_uncharged_by_a_dead_process_is_charged_once_by_the_replay(
    client: httpx.AsyncClient,
    credits: CreditsService,
    check: Checker,
    pg: asyncpg.Pool,
    redis_holds: RedisHolds,
    monkeypatch: pytest.MonkeyPatch,
    user_id: str,
    via: str,
) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201  # 10 credits
    rid = await _hold(client, user_id, 4)
    item = {"reservation_id": rid, "action": "commit", "amount": 4, "overage": 5}
    died = _die_once_in_the_overage(credits, monkeypatch)
    r = await client.post("/v1/reservations/batch", json={"items": [item]})
    assert died == [user_id] and r.status_code == 500, r.text
    # The commit's transaction is done; the overage is not.
    assert (await client.get(f"/v1/reservations/{rid}")).json()["status"] == "committed"
    left = await _totals(check, pg, client, user_id)
    assert (left["balance"], left["owed"], left["used"], left["usage"]) == (6, 0, 4, [4])

    result = await _deliver_again(via, client, redis_holds, user_id, item)
    if result is not None:  # answered as the first delivery would have been
        assert (result["status"], result["charged"], result["overage"], result["owed"]) == (200, 4, 5, 0)
        assert result["credits_remaining"] == 1
    charged = await _totals(check, pg, client, user_id)
    assert (charged["balance"], charged["owed"], charged["used"], charged["usage"]) == (1, 0, 9, [4, 5])
    assert charged["overage_entries"] == [f"reservation:{rid}:overage"]
    assert charged["charges"] == [(rid, 5, 5, 0)]

    # Delivered a third time (over HTTP, then parked): nothing more, answered as a replay always was.
    third = await _batch(client, item)
    assert (third["status"], third["charged"], third["refunded"]) == (200, 4, 0)
    assert "overage" not in third and "owed" not in third
    await redis_holds.park(user_id, [(rid, item)])
    await eventually(lambda: _pending_applied(credits, user_id), timeout=15)
    assert await _totals(check, pg, client, user_id) == charged


async def _pending_applied(credits: CreditsService, user_id: str) -> bool:
    return not await credits.app.state.runtime.holds.pending(user_id)


@pytest.mark.parametrize("dies", [True, False])
async def test_an_overage_the_balance_cannot_cover_is_owed_once_however_often_its_commit_arrives(
    client: httpx.AsyncClient,
    credits: CreditsService,
    check: Checker,
    pg: asyncpg.Pool,
    monkeypatch: pytest.MonkeyPatch,
    user_id: str,
    dies: bool,
) -> None:
    """All of it owed: no ledger entry is written for it, so its record alone keeps it to once."""
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    rid = await _hold(client, user_id, 10)  # the whole balance
    item = {"reservation_id": rid, "action": "commit", "amount": 10, "overage": 3}
    if dies:
        _die_once_in_the_overage(credits, monkeypatch)
        r = await client.post("/v1/reservations/batch", json={"items": [item]})
        assert r.status_code == 500, r.text
        assert (await _totals(check, pg, client, user_id))["owed"] == 0
    first = await _batch(client, item)
    assert (first["status"], first["charged"], first["overage"], first["owed"]) == (200, 10, 3, 3)
    for _ in range(2):
        again = await _batch(client, item)
        assert (again["status"], again["charged"]) == (200, 10)
        assert "overage" not in again and "owed" not in again
    totals = await _totals(check, pg, client, user_id)
    assert (totals["balance"], totals["owed"], totals["used"], totals["usage"]) == (0, 3, 10, [10])
    assert totals["overage_entries"] == []
    assert totals["charges"] == [(rid, 3, 0, 3)]


async def test_an_overage_charged_late_with_its_expired_hold_is_not_charged_again_by_a_replay(
    client: httpx.AsyncClient,
    check: Checker,
    pg: asyncpg.Pool,
    redis_holds: RedisHolds,
    user_id: str,
) -> None:
    """A parked commit whose hold expired is charged by `PendingSettlements.charge_late`, overage
    included; the commit delivered again afterwards is a replay and must not charge the overage."""
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 4, "ttl_seconds": 1})
    assert r.status_code == 201, r.text
    rid = str(r.json()["reservation_id"])

    async def expired() -> bool:
        return bool((await client.get(f"/v1/reservations/{rid}")).json()["status"] == "expired")

    await eventually(expired, timeout=15)
    spent = await _hold(client, user_id, 10)  # meanwhile the user spends the whole balance
    assert (await client.post(f"/v1/reservations/{spent}/commit")).status_code == 200
    item = {"reservation_id": rid, "action": "commit", "amount": 4, "overage": 3}
    await _deliver_again("parked", client, redis_holds, user_id, item)
    late = await _totals(check, pg, client, user_id)
    assert (late["balance"], late["owed"], late["used"]) == (0, 7, 17)
    assert late["charges"] == [(rid, 3, 0, 3)]
    again = await _batch(client, item)
    assert (again["status"], again["charged"]) == (200, 4) and "overage" not in again
    assert await _totals(check, pg, client, user_id) == late
