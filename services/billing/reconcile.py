"""Reconciliation: Stripe can fail to deliver a webhook. List the paid Checkout Sessions since a date and
push any whose purchase is not credited through the same domain path as a webhook (idempotent).

A short-lived command: it builds its parts with `runtime.py`'s builders (a small engine, the Stripe
client, a webhook receiver without the relay, which it drains once at the end)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from services.billing.catalog import load_catalog
from services.billing.config import BillingSettings
from services.billing.models import CREDITED
from services.billing.purchases import metadata_of
from services.billing.runtime import build_relay, migrate_if_asked, stripe_gateway
from services.billing.store import BillingStore
from services.billing.webhooks import WebhookReceiver
from shared.db import create_engine


class ReconcileError(Exception):
    pass


@dataclass(frozen=True)
class Repair:
    session_id: str
    purchase_id: str | None
    outcome: str


async def reconcile(
    settings: BillingSettings,
    since: datetime,
    *,
    echo: Callable[[str], None] = print,
    publish_timeout: float = 15.0,
) -> list[Repair]:
    if settings.test_mode:
        raise ReconcileError(
            "reconcile talks to Stripe: set STRIPE_API_KEY (and STRIPE_API_BASE for a test server)"
        )
    catalog = load_catalog(settings.packs_file)
    await migrate_if_asked(settings)
    engine = create_engine(settings.database_url, pool_size=2)
    gateway = stripe_gateway(settings)
    assert gateway is not None
    receiver = WebhookReceiver(engine, catalog, settings.webhook_secret, None, gateway)
    repairs: list[Repair] = []
    checked = 0
    try:
        async for session in gateway.checkout_sessions_since(int(since.timestamp())):
            if session.get("mode") != "payment" or session.get("payment_status") not in (
                "paid",
                "no_payment_required",
            ):
                continue
            session_id = str(session.get("id"))
            purchase_id = metadata_of(session.get("metadata")).get("purchase_id")
            if not purchase_id:
                continue  # not a session billing created
            checked += 1
            async with engine.connect() as conn:
                store = BillingStore(conn)
                purchase = await store.purchase_by_session(session_id) or await store.purchase(purchase_id)
            if purchase is not None and purchase.status in CREDITED:
                continue
            # A synthetic event, one per run: each run re-evaluates a session held for review, and the
            # purchase row lock (not the inbox) is what keeps a purchase from being credited twice.
            outcome = await receiver.apply(
                {
                    "id": f"reconcile_{session_id}_{uuid.uuid4().hex[:12]}",
                    "object": "event",
                    "type": "checkout.session.completed",
                    "created": int(time.time()),
                    "data": {"object": session},
                }
            )
            repair = Repair(session_id, outcome.purchase_id or purchase_id, outcome.result)
            repairs.append(repair)
            metadata = metadata_of(session.get("metadata"))
            verb = "repaired" if outcome.result == "credited" else "could not repair"
            echo(
                f"{verb} session {session_id}: purchase {repair.purchase_id} "
                f"(user {metadata.get('user_id')}, pack {metadata.get('pack')}) -> {outcome.result}"
            )
        credited = sum(1 for r in repairs if r.outcome == "credited")
        echo(
            f"checked {checked} paid checkout sessions since {since.isoformat()}; "
            f"repaired {credited}, left {len(repairs) - credited} for review"
        )
        if credited:
            await _publish_now(settings, engine, echo, publish_timeout)
    finally:
        await engine.dispose()
    return repairs


async def _publish_now(
    settings: BillingSettings, engine: object, echo: Callable[[str], None], timeout: float
) -> None:
    """The running service's relay would pick the rows up at its next poll; publishing here makes the
    credits arrive before the command returns when the broker is reachable."""
    relay = build_relay(settings, engine)
    try:
        sent = await asyncio.wait_for(relay.drain(), timeout)
        echo(f"published {sent} outbox message(s)")
    except Exception as exc:
        echo(f"could not publish now ({type(exc).__name__}: {exc}); billing's outbox relay will retry")
    finally:
        await relay.stop()
