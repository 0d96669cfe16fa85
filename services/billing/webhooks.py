"""Stripe webhook intake: verify the signature on the raw body, then record and apply the event in one
PostgreSQL transaction (inbox row, purchase change, outbox row). The caller answers 2xx only after
`receive` returned, i.e. after the commit: from then on the purchase cannot be lost, broker or not.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from services.billing.catalog import Catalog
from services.billing.purchases import Outcome, PurchaseBook, id_of, metadata_of
from services.billing.store import BillingStore
from services.billing.stripe_gateway import StripeFailure, StripeGateway, verify_webhook
from shared.outbox import OutboxRelay

log = logging.getLogger("billing.webhooks")


class WebhookReceiver:
    def __init__(
        self,
        engine: AsyncEngine,
        catalog: Catalog,
        secret: str,
        relay: OutboxRelay | None,
        gateway: StripeGateway | None = None,
    ) -> None:
        self._engine = engine
        self._catalog = catalog
        self._secret = secret
        self._relay = relay
        self._gateway = gateway

    async def receive(self, payload: bytes, signature_header: str | None) -> Outcome:
        """Raises `InvalidSignature` (→ 400, nothing recorded) before touching the database."""
        event = verify_webhook(payload, signature_header, self._secret)
        return await self.apply(event)

    async def apply(self, event: dict[str, Any]) -> Outcome:
        """Records and applies an event that is known to come from Stripe (verified, or fetched from its API)."""
        event_id: str = event["id"]
        event_type: str = event["type"]
        obj: dict[str, Any] = event["data"]["object"]
        hints = await self._refund_hints(event_type, obj)
        created = event.get("created")
        stripe_created = datetime.fromtimestamp(created, UTC) if isinstance(created, int) else None
        async with self._engine.begin() as conn:
            store = BillingStore(conn)
            if not await store.claim_stripe_event(event_id, event_type, stripe_created, event):
                return Outcome("duplicate")
            outcome = await PurchaseBook(store, self._catalog).apply(event_type, obj, hints)
            await store.record_event_outcome(event_id, outcome.result, outcome.purchase_id)
        log.info(
            "stripe event %s (%s): %s",
            event_id,
            event_type,
            outcome.result,
            extra={"fields": {"stripe_event": event_id, "purchase_id": outcome.purchase_id}},
        )
        if self._relay is not None:
            self._relay.wake()
        return outcome

    async def _refund_hints(self, event_type: str, obj: dict[str, Any]) -> dict[str, str]:
        """For a refunded charge that neither our rows nor its own metadata tie to a purchase, ask Stripe
        for the PaymentIntent's metadata (set at checkout). Done before the transaction: no network
        call while rows are locked."""
        if event_type != "charge.refunded" or self._gateway is None:
            return {}
        intent = obj.get("payment_intent")
        intent_id = id_of(intent)
        if (
            intent_id is None
            or isinstance(intent, dict)
            or metadata_of(obj.get("metadata")).get("purchase_id")
        ):
            return {}
        async with self._engine.connect() as conn:
            if await BillingStore(conn).purchase_by_payment_intent(intent_id) is not None:
                return {}
        try:
            return await self._gateway.payment_intent_metadata(intent_id)
        except StripeFailure as exc:
            # Stripe retries the webhook when we fail, so failing here is better than ignoring a refund.
            log.warning("cannot fetch PaymentIntent %s for a refund: %s", intent_id, exc)
            raise
