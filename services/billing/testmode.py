"""Local test mode (docs/api.md, Billing): billing's own checkout page, used when no STRIPE_API_KEY is set.

Pay builds the `checkout.session.completed` event Stripe would send (same object shape), signs it the
way Stripe does with the webhook secret, and hands the raw bytes and header to the webhook receiver:
the same code path as a real Stripe delivery. Cancel does the same with `checkout.session.expired`.
"""

from __future__ import annotations

import html
import secrets
import time
from typing import Any

from services.billing.models import Purchase
from services.billing.stripe_gateway import STRIPE_API_VERSION


def checkout_session_object(purchase: Purchase, *, paid: bool, expired: bool = False) -> dict[str, Any]:
    """A `checkout.session` in Stripe's shape (see Stripe's fixtures) for a local test purchase."""
    now = int(time.time())
    created = int(purchase.created_at.timestamp()) if purchase.created_at else now
    session_id = purchase.stripe_checkout_session_id or ""
    metadata = {"user_id": purchase.user_id, "pack": purchase.pack, "purchase_id": purchase.purchase_id}
    return {
        "id": session_id,
        "object": "checkout.session",
        "after_expiration": None,
        "allow_promotion_codes": None,
        "amount_subtotal": purchase.amount_cents,
        "amount_total": purchase.amount_cents,
        "automatic_tax": {"enabled": False, "liability": None, "status": None},
        "billing_address_collection": None,
        "cancel_url": purchase.cancel_url,
        "client_reference_id": purchase.user_id,
        "client_secret": None,
        "consent": None,
        "consent_collection": None,
        "created": created,
        "currency": purchase.currency,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": None,
        "customer_creation": "if_required",
        "customer_details": (
            {
                "address": None,
                "email": f"{purchase.user_id}@test-mode.invalid",
                "name": "Test Mode Customer",
                "phone": None,
                "tax_exempt": "none",
                "tax_ids": [],
            }
            if paid
            else None
        ),
        "customer_email": None,
        "expires_at": created + 24 * 3600,
        "invoice": None,
        "invoice_creation": {"enabled": False, "invoice_data": None},
        "livemode": False,
        "locale": None,
        "metadata": metadata,
        "mode": "payment",
        "payment_intent": purchase.stripe_payment_intent_id
        or (f"pi_test_local_{secrets.token_hex(12)}" if paid else None),
        "payment_link": None,
        "payment_method_collection": "if_required",
        "payment_method_configuration_details": None,
        "payment_method_options": {},
        "payment_method_types": ["card"],
        "payment_status": "paid" if paid else "unpaid",
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_options": [],
        "status": "complete" if paid else ("expired" if expired else "open"),
        "submit_type": None,
        "subscription": None,
        "success_url": purchase.success_url,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": None,
        "adaptive_pricing": {"enabled": False},
        "collected_information": None,
        "currency_conversion": None,
        "customer_account": None,
        "discounts": [],
        "integration_identifier": None,
        "managed_payments": {"enabled": False},
        "origin_context": None,
        "permissions": None,
        "saved_payment_method_options": None,
        "wallet_options": None,
    }


def event_envelope(event_type: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A v1 `event` as Stripe delivers it to a webhook endpoint."""
    return {
        "id": f"evt_test_local_{secrets.token_hex(12)}",
        "object": "event",
        "api_version": STRIPE_API_VERSION,
        "created": int(time.time()),
        "data": {"object": obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": event_type,
    }


def _money(cents: int, currency: str) -> str:
    symbol = "$" if currency == "usd" else ""
    amount = f"{cents / 100:,.2f}"
    return f"{symbol}{amount}" if symbol else f"{amount} {currency.upper()}"


def checkout_page(purchase: Purchase, pack_name: str) -> str:
    e = html.escape
    session_id = e(purchase.stripe_checkout_session_id or "")
    if purchase.status == "pending":
        actions = f"""
      <form method="post" action="/test-checkout/{session_id}/pay"><button class="pay" type="submit">Pay {e(_money(purchase.amount_cents, purchase.currency))}</button></form>
      <form method="post" action="/test-checkout/{session_id}/cancel"><button class="cancel" type="submit">Cancel</button></form>"""
    else:
        actions = f"<p>This checkout is already <strong>{e(purchase.status)}</strong>.</p>"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>TEST MODE checkout: {e(pack_name)}</title>
<style>
  body {{ font-family: system-ui, sans-serif; background: #f6f6f8; margin: 0; }}
  .banner {{ background: #d97706; color: #fff; text-align: center; padding: .6rem; font-weight: 700; letter-spacing: .08em; }}
  main {{ max-width: 26rem; margin: 3rem auto; background: #fff; border-radius: 12px; padding: 2rem; box-shadow: 0 2px 12px #0001; }}
  dl {{ display: grid; grid-template-columns: auto 1fr; gap: .4rem 1rem; }}
  dt {{ color: #666; }} dd {{ margin: 0; font-weight: 600; min-width: 0; overflow-wrap: anywhere; }}
  form {{ display: inline; }}
  button {{ font-size: 1rem; padding: .7rem 1.4rem; border-radius: 8px; border: 0; cursor: pointer; margin: 1rem .5rem 0 0; }}
  .pay {{ background: #4f46e5; color: #fff; }} .cancel {{ background: #e5e7eb; }}
  .note {{ color: #92400e; font-size: .9rem; }}
</style>
</head>
<body>
<div class="banner">TEST MODE: no real payment is taken</div>
<main>
  <h1>Checkout</h1>
  <p class="note">Billing runs without STRIPE_API_KEY, so this local page stands in for Stripe Checkout.
  Pay sends a signed <code>checkout.session.completed</code> webhook through billing's normal webhook path.</p>
  <dl>
    <dt>Pack</dt><dd>{e(pack_name)} ({e(purchase.pack)})</dd>
    <dt>Price</dt><dd>{e(_money(purchase.amount_cents, purchase.currency))}</dd>
    <dt>Credits</dt><dd>{purchase.credits:,}</dd>
    <dt>API access</dt><dd>{"unlocked by this pack" if purchase.unlocks_api else "not included"}</dd>
    <dt>Session</dt><dd><code>{session_id}</code></dd>
  </dl>
  {actions}
</main>
</body>
</html>
"""
