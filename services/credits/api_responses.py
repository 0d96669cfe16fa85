"""The JSON shapes of the credits API's answers, built from the domain's results (docs/api.md, Credits)."""

from __future__ import annotations

from typing import Any

from services.credits.accounts import Account, LedgerPage, Migrated
from services.credits.apikeys import ApiKey, KeyOwner
from services.credits.reservations import Extended, ReserveResult
from services.credits.settlements import SettleResult
from services.credits.stores.reservations import Reservation


def reservation_body(result: ReserveResult) -> dict[str, Any]:
    r = result.reservation
    return {
        "reservation_id": r.id,
        "user_id": r.user_id,
        "amount": r.amount,
        "status": r.status,
        "expires_at": r.expires_at,
        "credits_remaining": result.available,
    }


def recorded_body(reservation: Reservation) -> dict[str, Any]:
    """A recorded hold in a batch answer (whose "status" is the item's HTTP status, 201)."""
    return {
        "reservation_id": reservation.id,
        "user_id": reservation.user_id,
        "amount": reservation.amount,
        "expires_at": reservation.expires_at,
    }


def settle_body(result: SettleResult, *, commit: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"reservation_id": result.reservation_id}
    if commit:
        body["charged"] = result.charged
        if result.overage:
            body["overage"] = result.overage
            body["owed"] = result.owed
    body["refunded"] = result.refunded
    body["credits_remaining"] = result.available
    return body


def account_body(a: Account) -> dict[str, Any]:
    return {
        "user_id": a.user_id,
        "credits_remaining": a.credits_remaining,
        "credits_reserved": a.credits_reserved,
        "credits_purchased_total": a.credits_purchased_total,
        "credits_lifetime_used": a.credits_lifetime_used,
        "credits_owed": a.credits_owed,
        "api_access_unlocked": a.api_access_unlocked,
        "tier": a.tier,
        "support_tier": a.support_tier,
        "low_balance": a.low_balance,
        "last_purchase_date": a.last_purchase_date,
        "last_purchase_amount": a.last_purchase_amount,
        "created_at": a.created_at,
    }


def transactions_body(page: LedgerPage) -> dict[str, Any]:
    return {
        "data": [
            {
                "id": e.id,
                "type": e.type,
                "amount": e.amount,
                "balance_after": e.balance_after,
                "reference": e.reference,
                "created_at": e.created_at,
                "details": e.details,
            }
            for e in page.entries
        ],
        "has_more": page.has_more,
    }


def migrated_body(m: Migrated) -> dict[str, Any]:
    return {"user_id": m.user_id, "tier": m.tier, "credits": m.credits, "status": m.status}


def reservation_view(r: Reservation) -> dict[str, Any]:
    """GET /v1/reservations/{id}."""
    return {
        "reservation_id": r.id,
        "user_id": r.user_id,
        "amount": r.amount,
        "status": r.status,
        "charged": r.charged,
        "expires_at": r.expires_at,
    }


def extended_body(e: Extended) -> dict[str, Any]:
    """An extended hold in a batch answer (whose "status" is the item's HTTP status, 200)."""
    return {"reservation_id": e.reservation_id, "expires_at": e.expires_at}


def api_key_body(k: ApiKey) -> dict[str, Any]:
    return {
        "id": k.id,
        "name": k.name,
        "prefix": k.prefix,
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
    }


def key_owner_body(o: KeyOwner) -> dict[str, Any]:
    return {"user_id": o.user_id, "key_id": o.key_id, "api_access_unlocked": o.api_access_unlocked}
