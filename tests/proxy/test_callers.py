"""Who may call: API keys (cached, revocation honoured within 5 s), the API unlock, internal token,
JWTs; bad credentials and oversized bodies are refused with the envelope and charge nothing."""

from __future__ import annotations

import asyncio
import time

import httpx
import jwt
import openai
import pytest

from shared.devtoken import make_token
from tests.proxy.conftest import INTERNAL, Credits

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def _envelope(response: httpx.Response, status: int, code: str) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message"}
    assert error["code"] == code
    return dict(error)


async def test_api_key_of_unlocked_user_is_served(sdk, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(3, unlocked=True)
    key = await credits.api_key(user)
    raw = await sdk(api_key=key).chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-credits-charged"] == "1"
    await credits.settled(user, 2, usage_total=1)


async def test_bad_and_missing_credentials(gateway: httpx.AsyncClient, credits: Credits) -> None:
    _envelope(await gateway.post("/v1/chat/completions", json=CHAT), 401, "unauthorized")
    _envelope(
        await gateway.post(
            "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer cp_nonsense"}
        ),
        401,
        "invalid_api_key",
    )
    # The internal token must name a user.
    _envelope(await gateway.post("/v1/chat/completions", json=CHAT, headers=INTERNAL), 401, "unauthorized")
    _envelope(await gateway.get("/v1/account", headers={"Authorization": "Basic abc"}), 401, "unauthorized")


async def test_locked_key_message(proxy, credits: Credits) -> None:  # type: ignore[no-untyped-def]
    hint = await proxy.app.state.proxy.billing.unlock_hint()
    assert "Pro" in hint and "pro" in hint


async def test_jwt_account_access_and_bad_tokens(gateway: httpx.AsyncClient, credits: Credits) -> None:
    user = f"jwt-{time.time_ns()}"
    token = make_token(user)
    r = await gateway.get("/v1/account", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == user and r.json()["credits_remaining"] == 10  # created with signup credits
    expired = jwt.encode(
        {"sub": user, "exp": int(time.time()) - 60}, "dev-user-token-secret", algorithm="HS256"
    )
    forged = jwt.encode({"sub": user, "exp": int(time.time()) + 60}, "not-the-secret", algorithm="HS256")
    for bad in (expired, forged, token[:-4] + "AAAA"):
        _envelope(
            await gateway.get("/v1/account", headers={"Authorization": f"Bearer {bad}"}), 401, "unauthorized"
        )
    # A JWT is not an API credential.
    _envelope(
        await gateway.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token}"}),
        401,
        "unauthorized",
    )
    assert (await credits.account(user))["credits_remaining"] == 10


async def test_oversized_body_is_413_and_not_charged(credits: Credits, credits_url: str, standin) -> None:  # type: ignore[no-untyped-def]
    from tests.support.proxy_service import running_proxy

    user = await credits.user(5)
    async with running_proxy(
        credits_url=credits_url, upstream_base_url=standin.base_url, worker_enabled=False, max_body_bytes=2048
    ) as small:
        big = b'{"model":"gpt-4o","messages":[{"role":"user","content":"' + b"x" * 4096 + b'"}]}'
        async with httpx.AsyncClient(base_url=small.url) as http:
            r = await http.post(
                "/v1/chat/completions",
                content=big,
                headers={**INTERNAL, "X-User-Id": user, "content-type": "application/json"},
            )
        _envelope(r, 413, "payload_too_large")
    await credits.settled(user, 5, usage_total=0)


async def test_revoked_key_stops_working_within_5_seconds(
    sdk, credits: Credits, gateway: httpx.AsyncClient
) -> None:  # type: ignore[no-untyped-def]
    user = await credits.user(20, unlocked=True)
    key = await credits.api_key(user)
    client = sdk(api_key=key)
    await client.chat.completions.create(**CHAT)
    keys = (await gateway.get("/v1/account/api-keys", headers={**INTERNAL, "X-User-Id": user})).json()["data"]
    r = await gateway.delete(f"/v1/account/api-keys/{keys[0]['id']}", headers={**INTERNAL, "X-User-Id": user})
    assert r.status_code < 300, r.text
    revoked_at = time.monotonic()
    while True:
        try:
            await client.chat.completions.create(**CHAT)
        except openai.AuthenticationError as exc:
            assert exc.body["code"] == "invalid_api_key"  # type: ignore[index]
            break
        assert time.monotonic() - revoked_at < 5, "revoked key still accepted after 5 s"
        await asyncio.sleep(0.2)


async def test_account_endpoints(gateway: httpx.AsyncClient, credits: Credits) -> None:
    user = f"acct-{time.time_ns()}"
    auth = {"Authorization": f"Bearer {make_token(user)}"}
    packs = (await gateway.get("/v1/packs")).json()["data"]
    assert [p["id"] for p in packs][:2] == ["starter", "standard"]
    r = await gateway.post("/v1/account/checkout", json={"pack": "standard"}, headers=auth)
    assert r.status_code == 201, r.text
    assert r.json()["url"] and r.json()["session_id"]
    _envelope(
        await gateway.post("/v1/account/checkout", json={"pack": "nope"}, headers=auth), 404, "not_found"
    )
    assert (await gateway.get("/v1/account/purchases", headers=auth)).json()["data"][0]["status"] == "pending"
    tx = (await gateway.get("/v1/account/transactions", params={"limit": 1}, headers=auth)).json()
    assert tx["data"][0]["type"] == "signup_bonus"
    _envelope(
        await gateway.post("/v1/account/api-keys", json={"name": "k"}, headers=auth), 403, "api_access_locked"
    )
    r = await gateway.post(
        "/v1/webhooks/stripe", content=b'{"id":"evt_1"}', headers={"Stripe-Signature": "t=1,v1=bad"}
    )
    assert r.status_code == 400


async def test_portal_is_served(gateway: httpx.AsyncClient) -> None:
    r = await gateway.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    r = await gateway.get("/portal/app.js")
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/images/generations"])
async def test_not_json_is_400_and_not_charged(
    gateway: httpx.AsyncClient, credits: Credits, path: str
) -> None:
    user = await credits.user(2)
    r = await gateway.post(path, content=b"[1,2]", headers={**INTERNAL, "X-User-Id": user})
    _envelope(r, 400, "invalid_request")
    assert r.headers["x-credits-charged"] == "0" and r.headers["x-credits-remaining"] == "2"
