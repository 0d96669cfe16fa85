"""The purchases domain: what each Stripe event does to a purchase, and which messages it produces.

Rules (docs/api.md, Billing; docs/messages.md):
- A purchase is credited (status `paid` + one `billing.pack.purchased`) exactly once: the row is locked
  (`SELECT ... FOR UPDATE`) and only a purchase that was never credited moves to `paid`, so
  `checkout.session.completed` and `checkout.session.async_payment_succeeded`, repeated or concurrent,
  credit it once. The message's event id is derived from the purchase id, and the outbox ignores a
  second row with the same id, as a second guard.
- What is credited is what was sold: the purchase row written at checkout (pack, credits, price). A
  session whose user, pack, amount or currency disagrees with that row is recorded but not credited
  (`review_reason` says why, and it is logged).
- Refunds: `charge.refunded` carries Stripe's cumulative `amount_refunded`; the credits to claw back are
  floor(credits * amount_refunded / amount), also cumulative. `billing.pack.refunded.credits` is that
  cumulative total; the credits service claws back the difference from what it already took back for
  the purchase. A message goes out only when the cumulative credits grew. A refund that arrives while
  the purchase is still pending (Stripe does not order its events) is kept on the row and applied in
  the transaction that credits it.
- API unlock is not revoked by a refund: the unlock rules (docs/api.md) make `unlocks_api` a permanent property of
  the account once a qualifying pack was bought, and the credits (usage) are what a refund takes back.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from services.billing.catalog import Catalog, Pack
from services.billing.models import CREDITED, Purchase, Status
from services.billing.store import BillingStore
from shared.events import PackPurchased, PackRefunded

log = logging.getLogger("billing.purchases")

# Fixed namespace for deterministic message ids (uuid5), so a purchase maps to one "purchased" id.
_EVENT_NAMESPACE = uuid.UUID("5b0f1e2c-8f5e-4d53-9a55-1c2b1f6a7c01")


def new_purchase_id() -> str:
    return f"pur_{uuid.uuid4().hex}"


def pending_purchase(
    purchase_id: str,
    user_id: str,
    pack: Pack,
    session_id: str | None,
    *,
    success_url: str | None = None,
    cancel_url: str | None = None,
) -> Purchase:
    """A purchase of `pack` whose checkout session is open: priced and sized from the catalog."""
    return Purchase(
        purchase_id=purchase_id,
        user_id=user_id,
        pack=pack.id,
        credits=pack.credits,
        unlocks_api=pack.unlocks_api,
        amount_cents=pack.price_cents,
        currency=pack.currency,
        status=Status.PENDING.value,
        stripe_checkout_session_id=session_id,
        success_url=success_url,
        cancel_url=cancel_url,
    )


def purchased_message(purchase: Purchase) -> PackPurchased:
    return PackPurchased(
        event_id=uuid.uuid5(_EVENT_NAMESPACE, f"billing.pack.purchased:{purchase.purchase_id}"),
        purchase_id=purchase.purchase_id,
        user_id=purchase.user_id,
        pack=purchase.pack,
        credits=purchase.credits,
        unlocks_api=purchase.unlocks_api,
        amount_cents=purchase.amount_cents,
        currency=purchase.currency,
        stripe_checkout_session_id=purchase.stripe_checkout_session_id,
    )


def refunded_message(purchase: Purchase) -> PackRefunded:
    return PackRefunded(
        event_id=uuid.uuid5(
            _EVENT_NAMESPACE, f"billing.pack.refunded:{purchase.purchase_id}:{purchase.credits_refunded}"
        ),
        purchase_id=purchase.purchase_id,
        user_id=purchase.user_id,
        pack=purchase.pack,
        credits=purchase.credits_refunded,
        amount_cents=purchase.amount_refunded_cents,
        currency=purchase.currency,
    )


def refunded_credits(credits: int, amount_refunded: int, amount: int) -> int:
    """Credits to take back for a cumulative refund: in proportion, rounded down, never above `credits`."""
    if amount <= 0 or amount_refunded <= 0:
        return 0
    return min(credits, credits * min(amount_refunded, amount) // amount)


@dataclass(frozen=True)
class Outcome:
    """What processing an event did; recorded in the inbox row and returned to the caller."""

    result: str
    purchase_id: str | None = None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def id_of(value: Any) -> str | None:
    """Stripe fields like `payment_intent` are an id, or the object itself when expanded."""
    if isinstance(value, dict):
        return _str(value.get("id"))
    return _str(value)


def metadata_of(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if v is not None}


class PurchaseBook:
    """Applies Stripe facts to purchases through a store bound to one transaction."""

    def __init__(self, store: BillingStore, catalog: Catalog) -> None:
        self.store = store
        self.catalog = catalog

    async def apply(
        self, event_type: str, obj: dict[str, Any], hints: dict[str, str] | None = None
    ) -> Outcome:
        if event_type.startswith("checkout.session."):
            return await self._checkout_session(event_type, obj)
        if event_type == "charge.refunded":
            return await self._charge_refunded(obj, hints or {})
        return Outcome("ignored")

    # -- checkout sessions -------------------------------------------------------------------------

    async def _checkout_session(self, event_type: str, session: dict[str, Any]) -> Outcome:
        if event_type not in (
            "checkout.session.completed",
            "checkout.session.async_payment_succeeded",
            "checkout.session.async_payment_failed",
            "checkout.session.expired",
        ):
            return Outcome("ignored")
        purchase = await self._locate_or_create(session)
        if purchase is None:
            return Outcome("ignored_unknown_session")
        session_id = _str(session.get("id"))
        intent = id_of(session.get("payment_intent"))
        links: dict[str, Any] = {}
        if session_id and purchase.stripe_checkout_session_id is None:
            links["stripe_checkout_session_id"] = session_id
        if intent and purchase.stripe_payment_intent_id != intent:
            links["stripe_payment_intent_id"] = intent
        if links:
            await self.store.update_purchase(purchase.purchase_id, **links)
            purchase = replace(purchase, **links)

        paid = event_type == "checkout.session.async_payment_succeeded" or (
            event_type == "checkout.session.completed"
            and session.get("payment_status") in ("paid", "no_payment_required")
        )
        if paid:
            return await self._credit(purchase, session)
        if event_type == "checkout.session.completed":
            return Outcome("awaiting_payment", purchase.purchase_id)  # unpaid: stays pending
        new_status = Status.FAILED if event_type.endswith("async_payment_failed") else Status.EXPIRED
        if purchase.status != Status.PENDING:
            return Outcome(f"unchanged_{purchase.status}", purchase.purchase_id)
        await self.store.update_purchase(purchase.purchase_id, status=new_status.value)
        return Outcome(new_status.value, purchase.purchase_id)

    async def _locate_or_create(self, session: dict[str, Any]) -> Purchase | None:
        session_id = _str(session.get("id"))
        if session_id:
            found = await self.store.purchase_by_session(session_id, lock=True)
            if found is not None:
                return found
        metadata = metadata_of(session.get("metadata"))
        purchase_id = _str(metadata.get("purchase_id"))
        if purchase_id is None:
            log.warning("checkout session %s has no purchase_id in its metadata; not ours", session_id)
            return None
        found = await self.store.purchase(purchase_id, lock=True)
        if found is not None:
            return found
        # The session exists at Stripe but its purchase row does not (e.g. billing failed right after
        # creating it): rebuild the row from the metadata and today's catalog, checked in `_credit`.
        user_id = _str(metadata.get("user_id")) or _str(session.get("client_reference_id"))
        pack = self.catalog.get(metadata.get("pack", ""))
        if user_id is None or pack is None:
            log.warning(
                "checkout session %s names an unknown user or pack (%r); not crediting",
                session_id,
                metadata.get("pack"),
            )
            return None
        await self.store.insert_purchase(
            pending_purchase(purchase_id, user_id, pack, session_id),
            if_absent=True,
        )
        return await self.store.purchase(purchase_id, lock=True)

    @staticmethod
    def _disagreement(purchase: Purchase, session: dict[str, Any]) -> str | None:
        """Why this session must not credit this purchase, or None when everything matches."""
        metadata = metadata_of(session.get("metadata"))
        problems = []
        if metadata.get("user_id", purchase.user_id) != purchase.user_id:
            problems.append(f"metadata user_id {metadata.get('user_id')!r} != {purchase.user_id!r}")
        reference = _str(session.get("client_reference_id"))
        if reference is not None and reference != purchase.user_id:
            problems.append(f"client_reference_id {reference!r} != {purchase.user_id!r}")
        if metadata.get("pack", purchase.pack) != purchase.pack:
            problems.append(f"metadata pack {metadata.get('pack')!r} != {purchase.pack!r}")
        if metadata.get("purchase_id", purchase.purchase_id) != purchase.purchase_id:
            problems.append("metadata purchase_id differs")
        session_id = _str(session.get("id"))
        if session_id and purchase.stripe_checkout_session_id not in (None, session_id):
            problems.append(f"session {session_id} != {purchase.stripe_checkout_session_id}")
        amount = _int(session.get("amount_total"))
        if amount is not None and amount != purchase.amount_cents:
            problems.append(f"amount_total {amount} != price {purchase.amount_cents}")
        currency = _str(session.get("currency"))
        if currency is not None and currency.lower() != purchase.currency:
            problems.append(f"currency {currency!r} != {purchase.currency!r}")
        return "; ".join(problems) or None

    async def _credit(self, purchase: Purchase, session: dict[str, Any]) -> Outcome:
        if purchase.status in CREDITED:
            return Outcome("already_credited", purchase.purchase_id)
        problem = self._disagreement(purchase, session)
        if problem is not None:
            log.error(
                "paid checkout session does not match purchase %s: %s; NOT crediting",
                purchase.purchase_id,
                problem,
                extra={"fields": {"purchase_id": purchase.purchase_id}},
            )
            await self.store.update_purchase(purchase.purchase_id, review_reason=problem[:1000])
            return Outcome("held_for_review", purchase.purchase_id)
        now = datetime.now(UTC)
        await self.store.update_purchase(purchase.purchase_id, status=Status.PAID.value, paid_at=now)
        paid = replace(purchase, status=Status.PAID.value, paid_at=now)
        await self.store.enqueue(purchased_message(paid))
        log.info(
            "purchase %s paid: %d credits for %s",
            paid.purchase_id,
            paid.credits,
            paid.user_id,
            extra={"fields": {"purchase_id": paid.purchase_id, "user_id": paid.user_id}},
        )
        if paid.amount_refunded_cents > 0:
            # A refund that arrived before the payment (see `_charge_refunded`): its claw-back
            # follows the purchase, in the same transaction and in order.
            await self._record_refund(paid, paid.amount_refunded_cents, paid.amount_cents, None)
        return Outcome("credited", paid.purchase_id)

    # -- refunds -----------------------------------------------------------------------------------

    async def _charge_refunded(self, charge: dict[str, Any], hints: dict[str, str]) -> Outcome:
        intent_value = charge.get("payment_intent")
        intent = id_of(intent_value)
        purchase = await self.store.purchase_by_payment_intent(intent, lock=True) if intent else None
        if purchase is None:
            purchase_id = (
                metadata_of(charge.get("metadata")).get("purchase_id")
                or (
                    metadata_of(intent_value.get("metadata")).get("purchase_id")
                    if isinstance(intent_value, dict)
                    else None
                )
                or hints.get("purchase_id")
            )
            purchase = await self.store.purchase(purchase_id, lock=True) if purchase_id else None
        if purchase is None:
            log.warning("charge %s refunded, but no purchase matches it; ignored", charge.get("id"))
            return Outcome("ignored_unknown_charge")
        amount = _int(charge.get("amount")) or purchase.amount_cents
        amount_refunded = _int(charge.get("amount_refunded")) or 0
        if purchase.status not in CREDITED and purchase.status != Status.PENDING:
            log.warning("refund for purchase %s in status %s; ignored", purchase.purchase_id, purchase.status)
            return Outcome(f"ignored_{purchase.status}", purchase.purchase_id)
        if amount_refunded <= purchase.amount_refunded_cents:
            # An older (smaller) cumulative figure arriving late, or a repeat: nothing new.
            return Outcome("refund_already_recorded", purchase.purchase_id)
        if purchase.status == Status.PENDING:
            # Stripe delivers events in any order: the payment event of this refunded charge is still
            # on its way (or waits for reconcile). Keep the refund on the purchase; `_credit` applies
            # it when the purchase is credited. Acknowledging without keeping it would lose it.
            changes: dict[str, Any] = {"amount_refunded_cents": amount_refunded}
            if intent and purchase.stripe_payment_intent_id is None:
                changes["stripe_payment_intent_id"] = intent
            await self.store.update_purchase(purchase.purchase_id, **changes)
            log.warning(
                "refund for purchase %s arrived before its payment; applied once it is credited",
                purchase.purchase_id,
            )
            return Outcome("refund_recorded_before_payment", purchase.purchase_id)
        return await self._record_refund(purchase, amount_refunded, amount, intent)

    async def _record_refund(
        self, purchase: Purchase, amount_refunded: int, amount: int, intent: str | None
    ) -> Outcome:
        """Moves a credited purchase to its cumulative refund; enqueues a message when credits grew."""
        credits_back = max(
            purchase.credits_refunded, refunded_credits(purchase.credits, amount_refunded, amount)
        )
        status = Status.REFUNDED if amount_refunded >= amount else Status.PARTIALLY_REFUNDED
        changes: dict[str, Any] = {
            "status": status.value,
            "amount_refunded_cents": amount_refunded,
            "credits_refunded": credits_back,
        }
        if intent and purchase.stripe_payment_intent_id is None:
            changes["stripe_payment_intent_id"] = intent
        await self.store.update_purchase(purchase.purchase_id, **changes)
        if credits_back > purchase.credits_refunded:
            await self.store.enqueue(
                refunded_message(
                    replace(purchase, credits_refunded=credits_back, amount_refunded_cents=amount_refunded)
                )
            )
            log.info(
                "purchase %s %s: %d of %d credits to claw back in total",
                purchase.purchase_id,
                status.value,
                credits_back,
                purchase.credits,
            )
            return Outcome(status.value, purchase.purchase_id)
        return Outcome(f"{status.value}_no_new_credits", purchase.purchase_id)
