"""Every endpoint's bad inputs: the error envelope, and nothing changes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.credits.helpers import Checker, assert_envelope
from tests.support.credits_service import CreditsService

BAD_AMOUNTS: list[Any] = [
    0,
    -1,
    -(10**6),
    10**12 + 1,
    10**30,
    1.5,
    2.0,
    "3",
    True,
    False,
    None,
    [1],
    {"n": 1},
]


@pytest.fixture
async def victim(client: httpx.AsyncClient, credits: CreditsService, user_id: str) -> str:
    """A user with a ledger, an open hold, a committed hold and an API key."""
    await client.post("/v1/users", json={"user_id": user_id})
    await client.post(
        "/v1/admin/migrations/subscriptions",
        json={"users": [{"user_id": user_id, "tier": "pro"}]},
        headers=credits.admin_headers,
    )
    await client.post("/v1/reservations", json={"user_id": user_id, "amount": 5})
    r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 4})
    await client.post(f"/v1/reservations/{r.json()['reservation_id']}/commit")
    await client.post(f"/v1/users/{user_id}/api-keys", json={"name": "k"})
    return user_id


async def unchanged(check: Checker, client: httpx.AsyncClient, user_id: str, before: dict[str, Any]) -> None:
    after = await check.consistent(user_id, client)
    assert after == before


async def test_bad_amounts_change_nothing(
    client: httpx.AsyncClient, credits: CreditsService, check: Checker, victim: str
) -> None:
    before = await check.consistent(victim, client)
    open_hold = next(h for h in before["holds"] if h["status"] == "held")
    for amount in BAD_AMOUNTS:
        assert_envelope(
            await client.post("/v1/reservations", json={"user_id": victim, "amount": amount}),
            422,
            "invalid_request",
        )
        assert_envelope(
            await client.post(
                f"/v1/admin/users/{victim}/grants",
                json={"credits": amount, "reason": "x"},
                headers=credits.admin_headers,
            ),
            422,
            "invalid_request",
        )
        if amount not in (0, None) or isinstance(amount, bool):
            assert_envelope(
                await client.post(f"/v1/reservations/{open_hold['id']}/commit", json={"amount": amount}),
                422,
                "invalid_request",
            )
    # More than reserved.
    assert_envelope(
        await client.post(f"/v1/reservations/{open_hold['id']}/commit", json={"amount": 6}),
        400,
        "invalid_request",
    )
    for ttl in (0, -5, 1.5, "10", 10**9):
        r = await client.post("/v1/reservations", json={"user_id": victim, "amount": 1, "ttl_seconds": ttl})
        assert r.status_code in (400, 422) and r.json()["error"]["code"] == "invalid_request"
    await unchanged(check, client, victim, before)


async def test_malformed_bodies_and_user_ids(
    client: httpx.AsyncClient, credits: CreditsService, check: Checker, victim: str
) -> None:
    before = await check.consistent(victim, client)
    for body in (b"{not json", b"[]", b"null", b'"x"'):
        for path in ("/v1/reservations", "/v1/users", "/v1/api-keys/verify"):
            r = await client.post(path, content=body, headers={"content-type": "application/json"})
            assert_envelope(r, 422, "invalid_request")
    assert_envelope(await client.post("/v1/reservations", json={"amount": 1}), 422, "invalid_request")
    for bad_id in ("", "x" * 201, "bad\nid", "tab\tid", "nul\x00id", 7, None):
        r = await client.post("/v1/users", json={"user_id": bad_id})
        assert r.status_code in (400, 422) and r.json()["error"]["code"] == "invalid_request", (
            bad_id,
            r.text,
        )
        r = await client.post("/v1/reservations", json={"user_id": bad_id, "amount": 1})
        assert r.status_code in (400, 404, 422), (bad_id, r.text)
    assert_envelope(await client.get(f"/v1/users/{'x' * 201}/credits"), 400, "invalid_request")
    assert_envelope(
        await client.get(f"/v1/users/{victim}/transactions", params={"limit": 0}), 422, "invalid_request"
    )
    assert_envelope(
        await client.get(f"/v1/users/{victim}/transactions", params={"limit": "many"}), 422, "invalid_request"
    )
    assert_envelope(
        await client.get(f"/v1/users/{victim}/transactions", params={"before": "x"}), 422, "invalid_request"
    )
    assert_envelope(
        await client.post(
            "/v1/admin/migrations/subscriptions", json={"users": []}, headers=credits.admin_headers
        ),
        422,
        "invalid_request",
    )
    assert_envelope(
        await client.post(
            "/v1/admin/migrations/subscriptions",
            json={"users": [{"user_id": victim, "tier": "premium"}, {"user_id": victim, "tier": "pro"}]},
            headers=credits.admin_headers,
        ),
        400,
        "invalid_request",
    )
    assert_envelope(
        await client.post(
            f"/v1/admin/users/{victim}/grants", json={"credits": 5}, headers=credits.admin_headers
        ),
        422,
        "invalid_request",
    )
    await unchanged(check, client, victim, before)


async def test_unknown_users(client: httpx.AsyncClient, check: Checker) -> None:
    ghost = "ghost-user-that-does-not-exist"
    assert_envelope(await client.get(f"/v1/users/{ghost}/credits"), 404, "not_found")
    assert_envelope(await client.get(f"/v1/users/{ghost}/transactions"), 404, "not_found")
    assert_envelope(
        await client.post("/v1/reservations", json={"user_id": ghost, "amount": 1}), 404, "not_found"
    )
    assert_envelope(await client.post(f"/v1/users/{ghost}/api-keys", json={}), 404, "not_found")
    assert_envelope(await client.get(f"/v1/users/{ghost}/api-keys"), 404, "not_found")
    assert_envelope(await client.delete(f"/v1/users/{ghost}/api-keys/key_123"), 404, "not_found")
    assert (await check.state(ghost))["account"] is None


ENDPOINTS: list[tuple[str, str, dict[str, Any] | None, bool]] = [
    ("POST", "/v1/users", {"user_id": "{u}"}, False),
    ("GET", "/v1/users/{u}/credits", None, False),
    ("GET", "/v1/users/{u}/transactions", None, False),
    ("POST", "/v1/reservations", {"user_id": "{u}", "amount": 1}, False),
    ("POST", "/v1/reservations/{rid}/commit", {}, False),
    ("POST", "/v1/reservations/{rid}/release", None, False),
    ("POST", "/v1/users/{u}/api-keys", {"name": "x"}, False),
    ("GET", "/v1/users/{u}/api-keys", None, False),
    ("DELETE", "/v1/users/{u}/api-keys/{kid}", None, False),
    ("POST", "/v1/api-keys/verify", {"key": "cp_x"}, False),
    ("POST", "/v1/admin/users/{u}/grants", {"credits": 5, "reason": "x"}, True),
    ("POST", "/v1/admin/migrations/subscriptions", {"users": [{"user_id": "{u}", "tier": "pro"}]}, True),
    ("GET", "/v1/admin/analytics", None, True),
]


async def test_missing_and_wrong_tokens(
    client: httpx.AsyncClient, credits: CreditsService, check: Checker, victim: str
) -> None:
    before = await check.consistent(victim, client)
    rid = next(h["id"] for h in before["holds"] if h["status"] == "held")
    kid = before["keys"][0]["id"]

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{u}", victim).replace("{rid}", str(rid)).replace("{kid}", kid)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    async with httpx.AsyncClient(base_url=credits.url) as anon:
        for method, path, body, is_admin in ENDPOINTS:
            url = fill(path)
            kwargs: dict[str, Any] = {"json": fill(body)} if body is not None else {}
            wrong = credits.internal_token if is_admin else credits.admin_token
            for headers in (
                {},
                {"Authorization": "Bearer nope"},
                {"Authorization": "Basic abc"},
                {"Authorization": f"Bearer {wrong}"},
            ):
                r = await anon.request(method, url, headers=headers, **kwargs)
                assert_envelope(r, 401, "unauthorized")
    await unchanged(check, client, victim, before)
