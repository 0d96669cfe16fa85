"""Accounts, ledger paging, API keys and the admin endpoints."""

from __future__ import annotations

import hashlib
import uuid

import httpx

from shared.events import PackPurchased
from tests.credits.helpers import Checker, assert_envelope
from tests.support.credits_service import CreditsService

ACCOUNT_FIELDS = {
    "user_id",
    "credits_remaining",
    "credits_reserved",
    "credits_purchased_total",
    "credits_lifetime_used",
    "api_access_unlocked",
    "tier",
    "support_tier",
    "low_balance",
    "last_purchase_date",
    "last_purchase_amount",
    "created_at",
}


def admin(credits: CreditsService) -> dict[str, str]:
    return credits.admin_headers


async def test_create_user_grants_signup_credits_once(
    client: httpx.AsyncClient, check: Checker, user_id: str
) -> None:
    first = await client.post("/v1/users", json={"user_id": user_id})
    assert first.status_code == 201
    acct = first.json()
    assert ACCOUNT_FIELDS <= set(acct)
    assert acct["credits_remaining"] == 10 and acct["tier"] == "free" and acct["support_tier"] == "Community"
    assert acct["low_balance"] is False and acct["api_access_unlocked"] is False
    assert acct["last_purchase_date"] is None and acct["last_purchase_amount"] is None
    second = await client.post("/v1/users", json={"user_id": user_id})
    assert second.status_code == 200 and second.json() == acct
    s = await check.consistent(user_id, client)
    assert [(e["type"], e["amount"]) for e in s["ledger"]] == [("signup_bonus", 10)]


async def test_transactions_page_newest_first(
    client: httpx.AsyncClient, credits: CreditsService, user_id: str
) -> None:
    await client.post("/v1/users", json={"user_id": user_id})
    for n in range(1, 6):
        r = await client.post(
            f"/v1/admin/users/{user_id}/grants",
            json={"credits": n, "reason": f"r{n}"},
            headers=admin(credits),
        )
        assert r.status_code == 201
    page = (await client.get(f"/v1/users/{user_id}/transactions", params={"limit": 2})).json()
    assert [e["amount"] for e in page["data"]] == [5, 4] and page["has_more"] is True
    assert page["data"][0]["balance_after"] == 25 and page["data"][0]["type"] == "admin_add"
    assert set(page["data"][0]) == {
        "id",
        "type",
        "amount",
        "balance_after",
        "reference",
        "created_at",
        "details",
    }
    assert page["data"][0]["details"] is None  # only usage entries have details
    page2 = (
        await client.get(
            f"/v1/users/{user_id}/transactions", params={"limit": 2, "before": page["data"][-1]["id"]}
        )
    ).json()
    assert [e["amount"] for e in page2["data"]] == [3, 2] and page2["has_more"] is True
    page3 = (
        await client.get(
            f"/v1/users/{user_id}/transactions", params={"limit": 2, "before": page2["data"][-1]["id"]}
        )
    ).json()
    assert [e["type"] for e in page3["data"]] == ["admin_add", "signup_bonus"] and page3["has_more"] is False


async def test_grant_is_idempotent_with_a_grant_id_or_header(
    client: httpx.AsyncClient, credits: CreditsService, check: Checker, user_id: str
) -> None:
    # Creates the account (with its signup credits) when missing.
    for _ in range(3):
        r = await client.post(
            f"/v1/admin/users/{user_id}/grants",
            json={"credits": 7, "reason": "goodwill", "grant_id": "g1"},
            headers=admin(credits),
        )
        assert r.status_code in (200, 201)
    for _ in range(2):
        r = await client.post(
            f"/v1/admin/users/{user_id}/grants",
            json={"credits": 3, "reason": "goodwill"},
            headers={**admin(credits), "Idempotency-Key": "h1"},
        )
    s = await check.consistent(user_id, client)
    assert [(e["type"], e["amount"]) for e in s["ledger"]] == [
        ("signup_bonus", 10),
        ("admin_add", 7),
        ("admin_add", 3),
    ]


async def test_low_balance_support_tier_and_tier(
    client: httpx.AsyncClient, credits: CreditsService, user_id: str
) -> None:
    await client.post("/v1/users", json={"user_id": user_id})
    purchases = credits.app.state.runtime.purchases
    for pack, n in (("standard", 500), ("starter", 100)):
        await purchases.apply_purchase(
            PackPurchased(
                purchase_id=uuid.uuid4().hex,
                user_id=user_id,
                pack=pack,
                credits=n,
                unlocks_api=False,
                amount_cents=100,
                currency="usd",
            )
        )
    acct = (await client.get(f"/v1/users/{user_id}/credits")).json()
    # The largest pack ever bought, not the latest.
    assert acct["tier"] == "standard" and acct["support_tier"] == "Email (48h response)"
    assert acct["credits_purchased_total"] == 600 and acct["last_purchase_amount"] == 100
    r = await client.post("/v1/reservations", json={"user_id": user_id, "amount": 605})
    assert (await client.get(f"/v1/users/{user_id}/credits")).json()["low_balance"] is True
    await client.post(f"/v1/reservations/{r.json()['reservation_id']}/release")
    assert (await client.get(f"/v1/users/{user_id}/credits")).json()["low_balance"] is False


async def test_api_keys_lifecycle(
    client: httpx.AsyncClient, credits: CreditsService, check: Checker, user_id: str
) -> None:
    await client.post("/v1/users", json={"user_id": user_id})
    assert_envelope(
        await client.post(f"/v1/users/{user_id}/api-keys", json={"name": "ci"}), 403, "api_access_locked"
    )
    r = await client.post(
        "/v1/admin/migrations/subscriptions",
        json={"users": [{"user_id": user_id, "tier": "pro"}]},
        headers=admin(credits),
    )
    assert r.status_code == 200, r.text
    created = await client.post(f"/v1/users/{user_id}/api-keys", json={"name": "ci"})
    assert created.status_code == 201
    key = created.json()
    assert key["key"].startswith("cp_") and len(key["key"]) == 35 and key["key"].startswith(key["prefix"])
    assert set(key) >= {"id", "key", "prefix", "name", "created_at"}
    listed = (await client.get(f"/v1/users/{user_id}/api-keys")).json()["data"]
    assert (
        [k["id"] for k in listed] == [key["id"]]
        and "key" not in listed[0]
        and listed[0]["revoked_at"] is None
    )
    s = await check.state(user_id)
    async with check.pg.acquire() as conn:
        stored = await conn.fetchrow("SELECT key_hash FROM api_keys WHERE id = $1", key["id"])
    assert stored["key_hash"] == hashlib.sha256(key["key"].encode()).hexdigest()
    ok = await client.post("/v1/api-keys/verify", json={"key": key["key"]})
    assert ok.json() == {"user_id": user_id, "key_id": key["id"], "api_access_unlocked": True}
    other = f"{user_id}-other"
    await client.post("/v1/users", json={"user_id": other})
    assert_envelope(await client.delete(f"/v1/users/{other}/api-keys/{key['id']}"), 404, "not_found")
    assert (await client.delete(f"/v1/users/{user_id}/api-keys/{key['id']}")).status_code == 200
    assert_envelope(
        await client.post("/v1/api-keys/verify", json={"key": key["key"]}), 401, "invalid_api_key"
    )
    assert_envelope(
        await client.post("/v1/api-keys/verify", json={"key": "cp_" + "x" * 32}), 401, "invalid_api_key"
    )
    listed = (await client.get(f"/v1/users/{user_id}/api-keys")).json()["data"]
    assert listed[0]["revoked_at"] is not None
    assert s["keys"]


async def test_subscription_migration(
    client: httpx.AsyncClient, credits: CreditsService, check: Checker
) -> None:
    base = uuid.uuid4().hex[:8]
    tiers = {"free": 10, "basic": 40, "premium": 100, "pro": 250, "enterprise": 1000}
    users = [{"user_id": f"{base}-{t}", "tier": t} for t in tiers]
    for _ in range(2):  # once per user
        r = await client.post(
            "/v1/admin/migrations/subscriptions", json={"users": users}, headers=admin(credits)
        )
        assert r.status_code == 200, r.text
    for tier, n in tiers.items():
        s = await check.consistent(f"{base}-{tier}", client)
        assert [(e["type"], e["amount"]) for e in s["ledger"]] == [("signup_bonus", 10), ("migration", n)]
        assert s["ledger"][1]["reference"] == f"migration:{base}-{tier}"
        assert s["account"]["api_access_unlocked"] is (tier in ("pro", "enterprise"))
    # An unknown tier rejects the whole batch.
    bad = [{"user_id": f"{base}-new", "tier": "basic"}, {"user_id": f"{base}-x", "tier": "gold"}]
    assert_envelope(
        await client.post("/v1/admin/migrations/subscriptions", json={"users": bad}, headers=admin(credits)),
        400,
        "invalid_request",
    )
    assert (await check.state(f"{base}-new"))["account"] is None


async def test_analytics(client: httpx.AsyncClient, credits: CreditsService) -> None:
    r = await client.get("/v1/admin/analytics", headers=admin(credits))
    assert r.status_code == 200
    a = r.json()
    assert set(a) >= {
        "total_users",
        "paying_users",
        "conversion_rate",
        "tier_breakdown",
        "revenue_by_pack_cents",
        "total_credits_purchased",
        "total_credits_used",
        "total_credits_remaining",
    }
    assert a["total_users"] >= a["paying_users"] >= 0
    assert 0 <= a["conversion_rate"] <= 1
    assert abs(a["conversion_rate"] - a["paying_users"] / a["total_users"]) < 1e-9
    assert sum(a["tier_breakdown"].values()) == a["total_users"] and "free" in a["tier_breakdown"]


async def test_analytics_counts_a_new_paying_user(
    client: httpx.AsyncClient, credits: CreditsService, user_id: str
) -> None:
    before = (await client.get("/v1/admin/analytics", headers=admin(credits))).json()
    await credits.app.state.runtime.purchases.apply_purchase(
        PackPurchased(
            purchase_id=uuid.uuid4().hex,
            user_id=user_id,
            pack="pro",
            credits=1200,
            unlocks_api=True,
            amount_cents=3000,
            currency="usd",
        )
    )
    after = (await client.get("/v1/admin/analytics", headers=admin(credits))).json()
    assert after["total_users"] == before["total_users"] + 1
    assert after["paying_users"] == before["paying_users"] + 1
    assert (
        after["revenue_by_pack_cents"].get("pro", 0) == before["revenue_by_pack_cents"].get("pro", 0) + 3000
    )
    assert after["total_credits_purchased"] == before["total_credits_purchased"] + 1200
    assert after["tier_breakdown"].get("pro", 0) == before["tier_breakdown"].get("pro", 0) + 1
