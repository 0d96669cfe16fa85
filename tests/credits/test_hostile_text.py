"""Text PostgreSQL cannot store (NUL characters, unpaired surrogates) in any body field, path segment
or query value: a 4xx in the envelope and nothing written, never a 500/503 from the database."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from tests.credits.helpers import Checker
from tests.support.credits_service import CreditsService

# JSON text with a NUL and with an unpaired surrogate (valid JSON escapes, invalid text for PostgreSQL).
HOSTILE = ["nul\\u0000x", "half\\ud800x"]


def raw_json(template: str, value: str, user_id: str = "") -> bytes:
    """The body with `value` spliced in for `@` as an escaped JSON string (orjson cannot encode a
    surrogate), and `user_id` for `%USER`."""
    return template.replace("%USER", user_id).replace("@", value).encode()


def assert_refused(r: httpx.Response) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "code", "message"}, body


async def test_hostile_text_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, credits: CreditsService, check: Checker, user_id: str
) -> None:
    await client.post("/v1/users", json={"user_id": user_id})
    await client.post(
        "/v1/admin/migrations/subscriptions",
        json={"users": [{"user_id": user_id, "tier": "pro"}]},
        headers=credits.admin_headers,
    )
    key = (await client.post(f"/v1/users/{user_id}/api-keys", json={"name": "k"})).json()
    held = (await client.post("/v1/reservations", json={"user_id": user_id, "amount": 2})).json()
    before = await check.consistent(user_id, client)
    json_headers = {"content-type": "application/json"}
    admin_json = {**credits.admin_headers, **json_headers}

    for text in HOSTILE:
        calls: list[tuple[str, str, bytes | None, dict[str, str]]] = [
            ("POST", f"/v1/users/{user_id}/api-keys", raw_json('{"name": "@"}', text), json_headers),
            (
                "POST",
                f"/v1/admin/users/{user_id}/grants",
                raw_json('{"credits": 5, "reason": "@"}', text),
                admin_json,
            ),
            (
                "POST",
                f"/v1/admin/users/{user_id}/grants",
                raw_json('{"credits": 5, "reason": "ok", "grant_id": "@"}', text),
                admin_json,
            ),
            (
                "POST",
                "/v1/reservations",
                raw_json('{"user_id": "%USER", "amount": 1, "idempotency_key": "@"}', text, user_id),
                json_headers,
            ),
            ("POST", "/v1/users", raw_json('{"user_id": "@"}', text), json_headers),
            ("POST", "/v1/reservations", raw_json('{"user_id": "@", "amount": 1}', text), json_headers),
            (
                "POST",
                "/v1/admin/migrations/subscriptions",
                raw_json('{"users": [{"user_id": "%USER", "tier": "@"}]}', text, user_id),
                admin_json,
            ),
            ("POST", "/v1/api-keys/verify", raw_json('{"key": "cp_@"}', text), json_headers),
        ]
        for method, path, body, headers in calls:
            r = await client.request(method, path, content=body, headers=headers)
            assert_refused(r)

    # NUL in a path segment or a query value, percent-encoded as a client would send it.
    paths: list[tuple[str, str, dict[str, Any]]] = [
        ("DELETE", f"/v1/users/{user_id}/api-keys/{key['id']}%00", {}),
        ("DELETE", f"/v1/users/{user_id}/api-keys/%00", {}),
        ("GET", f"/v1/users/{user_id}%00/credits", {}),
        ("GET", f"/v1/users/{user_id}%00/api-keys", {}),
        ("POST", f"/v1/users/{user_id}%00/api-keys", {"json": {"name": "k"}}),
        ("GET", f"/v1/reservations/{held['reservation_id']}%00", {}),
        ("POST", f"/v1/reservations/{held['reservation_id']}%00/commit", {"json": {}}),
        ("POST", f"/v1/reservations/{held['reservation_id']}%00/release", {}),
        ("POST", f"/v1/admin/users/{user_id}%00/grants", {"json": {"credits": 5, "reason": "r"}}),
        ("GET", f"/v1/users/{user_id}/transactions?before=%00", {}),
    ]
    for method, path, kwargs in paths:
        headers = credits.admin_headers if "/admin/" in path else credits.headers
        r = await client.request(method, path, headers=headers, **kwargs)
        assert_refused(r)

    assert await check.consistent(user_id, client) == before
    batch = {
        "items": [
            {"reservation_id": held["reservation_id"] + "\x00", "action": "commit"},
        ]
    }
    r = await client.post("/v1/reservations/batch", content=orjson.dumps(batch), headers=json_headers)
    assert r.status_code == 200, r.text
    [result] = r.json()["results"]
    assert result["status"] == 422 and result["error"]["code"] == "invalid_request", result
    assert await check.consistent(user_id, client) == before
