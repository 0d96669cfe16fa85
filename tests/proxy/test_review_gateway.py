"""Review of the gateway's caller rules (docs/api.md, Proxy) and response headers: 401 comes before any
look at the body, an API key always acts for its owner whatever X-User-Id says, and every answer after
authentication carries the credit headers."""

from __future__ import annotations

import uuid

import httpx
import pytest

from shared.devtoken import make_token
from tests.proxy.conftest import INTERNAL, Credits

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
MALFORMED = b'{"model": "gpt-4o", "messages": ['


def _error(response: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "code", "message"}, body
    assert body["error"]["code"] == code, body
    return dict(body["error"])


@pytest.mark.parametrize(
    "path",
    ["/v1/chat/completions", "/v1/embeddings", "/v1/images/generations", "/v1/account/checkout"],
)
@pytest.mark.parametrize(
    "authorization,code",
    [(None, "unauthorized"), ("Bearer eyJhbGciOiJIUzI1NiJ9.e30.bad", "unauthorized")],
    ids=["none", "bad-jwt"],
)
async def test_malformed_body_without_credentials_is_401(
    gateway: httpx.AsyncClient, path: str, authorization: str | None, code: str
) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    _error(await gateway.post(path, content=MALFORMED, headers=headers), 401, code)


async def test_malformed_body_with_unknown_api_key_is_401_invalid_api_key(gateway: httpx.AsyncClient) -> None:
    r = await gateway.post(
        "/v1/chat/completions",
        content=MALFORMED,
        headers={"Authorization": "Bearer cp_unknown_key_000000", "Content-Type": "application/json"},
    )
    _error(r, 401, "invalid_api_key")


async def test_api_key_charges_its_owner_whatever_x_user_id_says(
    gateway: httpx.AsyncClient, credits: Credits
) -> None:
    owner = await credits.user(5, unlocked=True)
    victim = await credits.user(5)
    key = await credits.api_key(owner)
    r = await gateway.post(
        "/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {key}", "X-User-Id": victim},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-credits-charged"] == "1" and r.headers["x-credits-remaining"] == "4"
    await credits.settled(owner, 4, usage_total=1)
    await credits.settled(victim, 5, usage_total=0)
    # On the account reads an API key is its owner's too (docs/api.md, Proxy), whatever X-User-Id says.
    r = await gateway.get("/v1/account", headers={"Authorization": f"Bearer {key}", "X-User-Id": victim})
    assert r.status_code == 200 and r.json()["user_id"] == owner, r.text


async def test_jwt_acts_for_its_subject_whatever_x_user_id_says(
    gateway: httpx.AsyncClient, credits: Credits
) -> None:
    other = await credits.user(7)
    subject = f"jwt-{uuid.uuid4().hex[:10]}"
    r = await gateway.get(
        "/v1/account", headers={"Authorization": f"Bearer {make_token(subject)}", "X-User-Id": other}
    )
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == subject


async def test_402_has_the_contract_message_and_credit_headers_and_charges_nothing(
    gateway: httpx.AsyncClient, credits: Credits
) -> None:
    user = await credits.user(0)
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers={**INTERNAL, "X-User-Id": user})
    error = _error(r, 402, "insufficient_credits")
    assert error["message"] == "No credits remaining. Please purchase more credits."
    assert r.headers["x-credits-charged"] == "0"
    assert r.headers["x-credits-remaining"] == "0" and r.headers["x-credits-low"] == "true"
    await credits.settled(user, 0, usage_total=0)


async def test_upstream_4xx_and_bad_body_after_auth_carry_credit_headers(
    gateway: httpx.AsyncClient, credits: Credits
) -> None:
    user = await credits.user(8)
    headers = {**INTERNAL, "X-User-Id": user}
    bad = await gateway.post("/v1/chat/completions", content=b"[1, 2]", headers=headers)
    _error(bad, 400, "invalid_request")
    rejected = await gateway.post(
        "/v1/chat/completions", json={**CHAT, "model": "standin-fail-404"}, headers=headers
    )
    assert rejected.status_code == 404, rejected.text
    for r in (bad, rejected):
        assert r.headers["x-credits-charged"] == "0"
        assert r.headers["x-credits-remaining"] == "8"
        assert "x-credits-low" not in r.headers
    await credits.settled(user, 8, usage_total=0)


async def test_models_for_a_new_in_app_user_carry_the_remaining_header(gateway: httpx.AsyncClient) -> None:
    user = f"new-{uuid.uuid4().hex[:10]}"
    r = await gateway.get("/v1/models", headers={**INTERNAL, "X-User-Id": user})
    assert r.status_code == 200, r.text
    assert r.headers["x-credits-charged"] == "0"
    assert r.headers["x-credits-remaining"] == "10"


async def test_a_user_cannot_revoke_or_see_another_users_key(
    gateway: httpx.AsyncClient, credits: Credits
) -> None:
    owner = await credits.user(3, unlocked=True)
    key = await credits.api_key(owner)
    listed = await gateway.get("/v1/account/api-keys", headers={**INTERNAL, "X-User-Id": owner})
    assert listed.status_code == 200, listed.text
    (entry,) = listed.json()["data"]
    assert "key" not in entry and key.startswith(entry["prefix"])
    intruder = {"Authorization": f"Bearer {make_token(f'jwt-{uuid.uuid4().hex[:10]}')}"}
    assert (await gateway.get("/v1/account/api-keys", headers=intruder)).json()["data"] == []
    _error(await gateway.delete(f"/v1/account/api-keys/{entry['id']}", headers=intruder), 404, "not_found")
    # The key still works for its owner.
    r = await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    await credits.settled(owner, 2, usage_total=1)
