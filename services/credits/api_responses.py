"""The JSON shapes of the credits API's answers, built from the domain's results (docs/api.md, Credits)."""

from __future__ import annotations

from datetime import date
from typing import Any

from services.credits.accounts import Account, LedgerPage, Migrated
from services.credits.analytics import DayFigures, Figures
from services.credits.apikeys import ApiKey, KeyOwner
from services.credits.reservations import Extended, ReserveResult
from services.credits.settlements import SettleResult
from services.credits.stores.reservations import Reservation

# Answers whose keys are the result's field names, in this order.
ACCOUNT_KEYS = (
    "user_id credits_remaining credits_reserved credits_purchased_total credits_lifetime_used credits_owed "
    "api_access_unlocked tier support_tier low_balance last_purchase_date last_purchase_amount created_at"
).split()
LEDGER_ENTRY_KEYS = "id type amount balance_after reference created_at details".split()
MIGRATED_KEYS = "user_id tier credits status".split()
API_KEY_KEYS = "id name prefix created_at revoked_at".split()
KEY_OWNER_KEYS = "user_id key_id api_access_unlocked".split()
RESERVATION_KEYS = "user_id amount status charged expires_at".split()  # after its reservation_id
# GET /v1/admin/analytics: the figures up to usage_by_model, then after it up to the funnel.
FIGURES_KEYS = (
    "total_users paying_users conversion_rate tier_breakdown revenue_by_pack_cents total_credits_purchased "
    "total_credits_used total_credits_remaining revenue_cents packs_sold average_pack_cents "
    "lifetime_value_cents repeat_purchase_rate median_days_between_purchases credit_utilization "
    "credits_granted_or_bought usage_by_operation"
).split()
COST_KEYS = "upstream_cost_usd upstream_cost_per_credit_usd gross_margin".split()
MODEL_USAGE_KEYS = "requests credits upstream_cost_usd".split()
FUNNEL_KEYS = "signed_up bought bought_again".split()
PACK_KEYS = (
    "pack price_cents credits packs_sold revenue_cents refunded_cents upstream_cost_usd margin".split()
)
DAY_KEYS = (
    "new_users paying_users revenue_cents packs_sold credits_purchased credits_used upstream_cost_usd".split()
)


def _pick(result: object, keys: list[str]) -> dict[str, Any]:
    return {key: getattr(result, key) for key in keys}


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
    return _pick(a, ACCOUNT_KEYS)


def transactions_body(page: LedgerPage) -> dict[str, Any]:
    return {"data": [_pick(e, LEDGER_ENTRY_KEYS) for e in page.entries], "has_more": page.has_more}


def migrated_body(m: Migrated) -> dict[str, Any]:
    return _pick(m, MIGRATED_KEYS)


def reservation_view(r: Reservation) -> dict[str, Any]:
    """GET /v1/reservations/{id}."""
    return {"reservation_id": r.id, **_pick(r, RESERVATION_KEYS)}


def extended_body(e: Extended) -> dict[str, Any]:
    """An extended hold in a batch answer (whose "status" is the item's HTTP status, 200)."""
    return {"reservation_id": e.reservation_id, "expires_at": e.expires_at}


def api_key_body(k: ApiKey) -> dict[str, Any]:
    return _pick(k, API_KEY_KEYS)


def key_owner_body(o: KeyOwner) -> dict[str, Any]:
    return _pick(o, KEY_OWNER_KEYS)


def _day_body(d: DayFigures) -> dict[str, Any]:
    return {"date": d.day.isoformat(), **_pick(d, DAY_KEYS)}


def analytics_body(f: Figures, first: date | None, last: date | None) -> dict[str, Any]:
    """GET /v1/admin/analytics: the figures and the range asked for (None: open)."""
    return {
        **_pick(f, FIGURES_KEYS),
        "usage_by_model": {model: _pick(u, MODEL_USAGE_KEYS) for model, u in f.usage_by_model.items()},
        **_pick(f, COST_KEYS),
        "funnel": _pick(f.funnel, FUNNEL_KEYS),
        "packs": [_pick(p, PACK_KEYS) for p in f.packs],
        "daily": [_day_body(d) for d in f.daily],
        "from": first.isoformat() if first else None,
        "to": last.isoformat() if last else None,
    }
