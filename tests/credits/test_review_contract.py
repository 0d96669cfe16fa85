"""Contract edges of the credits API found in review: authentication is judged before the body (a caller
without the token gets 401 however malformed its body), and an idempotency key keeps returning its
reservation after that reservation has ended."""

from __future__ import annotations

import httpx
import pytest

from tests.credits.helpers import Checker, assert_envelope
from tests.support.credits_service import CreditsService

POSTS = [
    pytest.param("/v1/users", "internal", id="create-user"),
    pytest.param("/v1/users/u-review/api-keys", "internal", id="create-api-key"),
    pytest.param("/v1/admin/users/u-review/grants", "admin", id="admin-grant"),
    pytest.param("/v1/admin/migrations/subscriptions", "admin", id="admin-migration"),
    pytest.param("/v1/reservations", "internal", id="reserve"),
    pytest.param("/v1/reservations/batch", "internal", id="settle-batch"),
    pytest.param("/v1/reservations/00000000-0000-0000-0000-000000000000/commit", "internal", id="commit"),
    pytest.param("/v1/api-keys/verify", "internal", id="verify-key"),
]


@pytest.mark.parametrize("path,role", POSTS)
@pytest.mark.parametrize("token", [None, "not-the-token"], ids=["no-token", "wrong-token"])
async def test_malformed_body_without_valid_token_is_401_and_changes_nothing(
    credits: CreditsService, check: Checker, path: str, role: str, token: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(base_url=credits.url, timeout=30) as anonymous:
        r = await anonymous.post(path, content=b'{"user_id": "u-review", "credits": 5', headers=headers)
    assert_envelope(r, 401, "unauthorized")
    assert (await check.state("u-review"))["account"] is None


async def _reserve(client: httpx.AsyncClient, user_id: str, amount: int, key: str) -> httpx.Response:
    return await client.post(
        "/v1/reservations", json={"user_id": user_id, "amount": amount, "idempotency_key": key}
    )


async def test_idempotency_key_after_release_returns_the_same_reservation(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    first = await _reserve(client, user_id, 4, "k-release")
    assert first.status_code == 201, first.text
    rid = first.json()["reservation_id"]
    assert (await client.post(f"/v1/reservations/{rid}/release")).status_code == 200
    again = await _reserve(client, user_id, 4, "k-release")
    assert again.status_code in (200, 201), again.text
    assert again.json()["reservation_id"] == rid
    s = await check.consistent(user_id, client)
    assert [h["status"] for h in s["holds"]] == ["released"]
    assert s["account"]["balance"] == 10


async def test_idempotency_key_after_commit_returns_the_same_reservation_even_when_spent(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    first = await _reserve(client, user_id, 10, "k-commit")
    assert first.status_code == 201, first.text
    rid = first.json()["reservation_id"]
    assert (await client.post(f"/v1/reservations/{rid}/commit", json={})).json()["charged"] == 10
    # The caller's retry of the same reserve (its first answer was lost): the same reservation, no 402.
    again = await _reserve(client, user_id, 10, "k-commit")
    assert again.status_code in (200, 201), again.text
    assert again.json()["reservation_id"] == rid
    s = await check.consistent(user_id, client)
    assert s["account"]["balance"] == 0 and len(s["holds"]) == 1


@pytest.mark.parametrize(
    "method,path,content",
    [
        ("POST", "/v1/users", b'{"user_id": 5}'),
        ("POST", "/v1/admin/users/u-review/grants", b'{"credits": -1}'),
        ("POST", "/v1/admin/migrations/subscriptions", b'{"users": "all"}'),
        ("GET", "/v1/users/u-review/transactions?limit=abc&before=-1", b""),
    ],
    ids=["create-user", "grant", "migration", "transactions"],
)
async def test_invalid_fields_without_token_are_401(
    credits: CreditsService, check: Checker, method: str, path: str, content: bytes
) -> None:
    async with httpx.AsyncClient(base_url=credits.url, timeout=30) as anonymous:
        r = await anonymous.request(
            method, path, content=content or None, headers={"Content-Type": "application/json"}
        )
    assert_envelope(r, 401, "unauthorized")
    assert (await check.state("u-review"))["account"] is None
