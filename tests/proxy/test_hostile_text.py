"""NUL characters sent to the gateway's account endpoints (in a body, a path segment, a query value, a
sign-in token's subject) are refused with a 4xx in the envelope and change nothing, never a 5xx."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest

from tests.proxy.conftest import INTERNAL, Credits

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


def assert_refused(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert set(r.json()["error"]) == {"type", "code", "message"}, r.text


async def test_nul_characters_are_refused_and_change_nothing(
    gateway: httpx.AsyncClient, credits: Credits
) -> None:
    user = await credits.user(5, unlocked=True)
    await credits.api_key(user)
    me = {**INTERNAL, "X-User-Id": user, "content-type": "application/json"}
    keys = (await gateway.get("/v1/account/api-keys", headers=me)).json()["data"]
    ledger = await credits.ledger(user)

    assert_refused(await gateway.post("/v1/account/api-keys", content=b'{"name": "a\\u0000b"}', headers=me))
    assert_refused(await gateway.delete(f"/v1/account/api-keys/{keys[0]['id']}%00", headers=me))
    assert_refused(
        await gateway.post("/v1/account/checkout", content=b'{"pack": "starter\\u0000"}', headers=me)
    )
    assert_refused(await gateway.get("/v1/account/transactions?before=%00", headers=me))
    sub = f"nul\x00{time.time_ns()}"
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, "dev-user-token-secret", algorithm="HS256")
    assert_refused(await gateway.get("/v1/account", headers={"Authorization": f"Bearer {token}"}))

    assert (await gateway.get("/v1/account/api-keys", headers=me)).json()[
        "data"
    ] == keys  # none added or revoked
    assert (await gateway.get("/v1/account/purchases", headers=me)).json()["data"] == []  # no checkout
    assert await credits.ledger(user) == ledger
