"""Starting a checkout: pick the pack, create the Checkout Session (Stripe, or the local test page),
record the purchase as `pending`."""

from __future__ import annotations

import secrets
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from services.billing.catalog import Catalog
from services.billing.models import Purchase
from services.billing.purchases import new_purchase_id, pending_purchase
from services.billing.store import BillingStore
from services.billing.stripe_gateway import CheckoutRequest, CreatedSession, StripeFailure
from shared.errors import NotFound, UpstreamError


class CheckoutGateway(Protocol):
    async def create_checkout_session(self, request: CheckoutRequest) -> CreatedSession: ...


class LocalTestCheckout:
    """docs/api.md, Billing: without a Stripe key, sessions are billing's own test checkout page."""

    def __init__(self, public_url: str) -> None:
        self._public_url = public_url.rstrip("/")

    async def create_checkout_session(self, request: CheckoutRequest) -> CreatedSession:
        session_id = f"cs_test_local_{secrets.token_hex(16)}"
        return CreatedSession(id=session_id, url=f"{self._public_url}/test-checkout/{session_id}")


class CheckoutService:
    def __init__(
        self,
        engine: AsyncEngine,
        catalog: Catalog,
        gateway: CheckoutGateway,
        default_success_url: str,
        default_cancel_url: str,
    ) -> None:
        self._engine = engine
        self._catalog = catalog
        self._gateway = gateway
        self._success_url = default_success_url
        self._cancel_url = default_cancel_url

    async def start(
        self, user_id: str, pack_id: str, success_url: str | None = None, cancel_url: str | None = None
    ) -> tuple[Purchase, CreatedSession]:
        pack = self._catalog.get(pack_id)
        if pack is None:
            raise NotFound(f"Unknown pack {pack_id!r}.")
        request = CheckoutRequest(
            purchase_id=new_purchase_id(),
            user_id=user_id,
            pack=pack,
            success_url=success_url or self._success_url,
            cancel_url=cancel_url or self._cancel_url,
        )
        # Stripe first, then the row: a failed Stripe call leaves nothing behind. Should the insert
        # fail after Stripe said yes, the webhook rebuilds the purchase from the session's metadata.
        try:
            session = await self._gateway.create_checkout_session(request)
        except StripeFailure as exc:
            raise UpstreamError(f"Stripe could not create the checkout session: {exc}") from exc
        purchase = pending_purchase(
            request.purchase_id,
            user_id,
            pack,
            session.id,
            success_url=request.success_url,
            cancel_url=request.cancel_url,
        )
        async with self._engine.begin() as conn:
            await BillingStore(conn).insert_purchase(purchase)
        return purchase, session
