"""What the gateway trusts (issue 12, holes 8 and §6.3): user API keys may read their owner's account
but not act for them; sign-in tokens must expire; made-up keys do not each cost a call to credits;
a request's Host header never becomes a URL the gateway hands out."""

from __future__ import annotations

import secrets
import time
from typing import Any

import httpx
import jwt
import pytest
from prometheus_client import REGISTRY

from services.proxy.config import ProxySettings
from tests.proxy.conftest import INTERNAL, Credits
from tests.support.proxy_service import RunningProxy

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

HOSTILE_HOST = "evil.example"


def _envelope(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "code", "message"} and error["code"] == code, error


def verify_calls() -> float:
    """Calls credits' key verification has answered in this process (its latency histogram)."""
    total = 0.0
    for status in ("200", "401"):
        labels = {"service": "credits", "method": "POST", "route": "/v1/api-keys/verify", "status": status}
        total += REGISTRY.get_sample_value("http_request_duration_seconds_count", labels) or 0.0
    return total


def made_up_key() -> str:
    return "cp_" + secrets.token_urlsafe(24)


async def key_ids(credits: Credits, user: str) -> list[tuple[str, Any]]:
    r = await credits.http.get(f"/v1/users/{user}/api-keys", headers=INTERNAL)
    return [(k["id"], k["revoked_at"]) for k in r.json()["data"]]


async def test_user_api_key_reads_its_own_account_but_cannot_act(
    gateway: httpx.AsyncClient, credits: Credits
) -> None:
    user = await credits.user(7, unlocked=True)
    other = await credits.user(3)
    key = await credits.api_key(user)
    as_internal = {**INTERNAL, "X-User-Id": user}
    assert (
        await gateway.post("/v1/account/checkout", json={"pack": "starter"}, headers=as_internal)
    ).is_success
    # X-User-Id is the internal token's companion; with an API key it names nobody.
    auth = {"Authorization": f"Bearer {key}", "X-User-Id": other}

    r = await gateway.get("/v1/account", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json() == await credits.account(user)
    r = await gateway.get("/v1/account/transactions", params={"limit": 100}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == await credits.ledger(user)
    r = await gateway.get("/v1/account/purchases", headers=auth)
    assert r.status_code == 200, r.text
    assert [(p["pack"], p["status"]) for p in r.json()["data"]] == [("starter", "pending")]

    keys_before = await key_ids(credits, user)
    _envelope(await gateway.post("/v1/account/api-keys", json={"name": "x"}, headers=auth), 403, "forbidden")
    _envelope(
        await gateway.delete(f"/v1/account/api-keys/{keys_before[0][0]}", headers=auth), 403, "forbidden"
    )
    _envelope(await gateway.get("/v1/account/api-keys", headers=auth), 403, "forbidden")
    _envelope(
        await gateway.post("/v1/account/checkout", json={"pack": "pro"}, headers=auth), 403, "forbidden"
    )
    assert await key_ids(credits, user) == keys_before  # none created, none revoked
    purchases = (await gateway.get("/v1/account/purchases", headers=as_internal)).json()["data"]
    assert [p["pack"] for p in purchases] == ["starter"]  # no checkout started
    assert (await gateway.get("/v1/account", headers=auth)).status_code == 200  # the key still works

    _envelope(
        await gateway.get("/v1/account", headers={"Authorization": f"Bearer {made_up_key()}"}),
        401,
        "invalid_api_key",
    )


async def test_sign_in_tokens_without_exp_are_refused(gateway: httpx.AsyncClient, credits: Credits) -> None:
    user = f"noexp-{time.time_ns()}"
    forever = jwt.encode({"sub": user}, "dev-user-token-secret", algorithm="HS256")
    _envelope(
        await gateway.get("/v1/account", headers={"Authorization": f"Bearer {forever}"}), 401, "unauthorized"
    )
    # Refused before anything was done for that user: no account was created.
    r = await credits.http.get(f"/v1/users/{user}/credits", headers=INTERNAL)
    assert r.status_code == 404, r.text
    valid = jwt.encode(
        {"sub": user, "exp": int(time.time()) + 60}, "dev-user-token-secret", algorithm="HS256"
    )
    assert (await gateway.get("/v1/account", headers={"Authorization": f"Bearer {valid}"})).status_code == 200


async def test_made_up_keys_do_not_each_reach_credits(
    proxy: RunningProxy, gateway: httpx.AsyncClient, credits: Credits, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Refusals are remembered API_KEY_NEGATIVE_CACHE_SECONDS (2 s); longer here, so that a slow
    # machine's loop below stays within it.
    monkeypatch.setattr(proxy.app.state.proxy.auth, "_negative_ttl", 120.0)
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    before = verify_calls()
    # 1,000 bearer values that cannot be keys: refused without a call.
    for _ in range(1000):
        junk = secrets.choice(["sk-", "cp_", "", "Bearer-"]) + secrets.token_hex(secrets.choice([4, 20, 40]))
        r = await gateway.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {junk}"})
        _envelope(r, 401, "invalid_api_key")
    assert verify_calls() == before
    # One well-formed unknown key hammered: one call, the refusal is remembered.
    unknown = made_up_key()
    for _ in range(300):
        r = await gateway.get("/v1/account", headers={"Authorization": f"Bearer {unknown}"})
        _envelope(r, 401, "invalid_api_key")
    assert verify_calls() == before + 1


async def test_refusal_cache_is_bounded_and_never_evicts_real_keys(
    proxy: RunningProxy, gateway: httpx.AsyncClient, credits: Credits, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = proxy.app.state.proxy.auth
    monkeypatch.setattr("services.proxy.callers.REFUSALS_LIMIT", 40)
    monkeypatch.setattr(auth, "_negative_ttl", 120.0)
    monkeypatch.setattr(auth, "_positive_ttl", 120.0)
    user = await credits.user(5, unlocked=True)
    key = await credits.api_key(user)
    assert (await gateway.get("/v1/account", headers={"Authorization": f"Bearer {key}"})).status_code == 200
    flood = [made_up_key() for _ in range(100)]
    for bad in flood:
        await gateway.get("/v1/account", headers={"Authorization": f"Bearer {bad}"})
    assert len(auth._refused) == 40
    calls = verify_calls()
    # The newest refusals are remembered (no call), the real key still is (no call), the oldest
    # refusal was forgotten (one call).
    for bad in flood[-40:]:
        await gateway.get("/v1/account", headers={"Authorization": f"Bearer {bad}"})
    assert (await gateway.get("/v1/account", headers={"Authorization": f"Bearer {key}"})).status_code == 200
    assert verify_calls() == calls
    await gateway.get("/v1/account", headers={"Authorization": f"Bearer {flood[0]}"})
    assert verify_calls() == calls + 1


async def test_host_header_never_becomes_a_checkout_return_url(
    proxy: RunningProxy, gateway: httpx.AsyncClient, credits: Credits
) -> None:
    user = await credits.user(1)
    r = await gateway.post(
        "/v1/account/checkout",
        json={"pack": "starter"},
        headers={**INTERNAL, "X-User-Id": user, "Host": HOSTILE_HOST},
    )
    assert r.status_code == 201, r.text
    # The local test checkout's Pay button sends the customer to the session's success URL.
    async with httpx.AsyncClient(timeout=30) as browser:
        paid = await browser.post(r.json()["url"] + "/pay", follow_redirects=False)
    assert paid.status_code == 303, paid.text
    assert proxy.settings.public_base_url == proxy.url  # the test proxy's PUBLIC_BASE_URL
    assert paid.headers["location"] == f"{proxy.url}/?checkout=success"


async def test_host_header_never_becomes_a_redirect_target(
    proxy: RunningProxy, gateway: httpx.AsyncClient, credits_url: str
) -> None:
    r = await gateway.get("/v1/packs/", headers={"Host": HOSTILE_HOST})
    assert r.status_code == 307, r.text
    assert r.headers["location"] == f"{proxy.settings.public_base_url}/v1/packs"
    async with httpx.AsyncClient(base_url=credits_url) as http:
        r = await http.get("/v1/users/u1/credits/", headers={**INTERNAL, "Host": HOSTILE_HOST})
    assert r.status_code == 307, r.text
    assert r.headers["location"] == "/v1/users/u1/credits"  # credits hands out no host at all


def test_public_base_url_defaults_to_the_local_gateway_and_production_needs_it() -> None:
    assert ProxySettings().public_base_url == "http://127.0.0.1:8000"
    secrets_set = {"internal_token": "i" * 32, "user_token_secret": "s" * 32}
    with pytest.raises(ValueError, match="PUBLIC_BASE_URL"):
        ProxySettings(environment="production", **secrets_set)
    settings = ProxySettings(
        environment="production", public_base_url="https://gateway.example.com/", **secrets_set
    )
    assert settings.public_base_url == "https://gateway.example.com"
