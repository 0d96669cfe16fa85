"""AMQP entrypoint: billing's purchase and refund events → the ledger (exactly once per purchase_id).

Queue `credits.billing-events` (suffixed by the broker namespace), bound to `billing.pack.purchased`
and `billing.pack.refunded`.

- A purchase is applied once per purchase_id: the `purchases` row (primary key purchase_id) and the
  ledger entry `purchase:<purchase_id>` are written in the same transaction as the balance change and
  the outbox rows of `credits.purchase.applied` / `credits.api_access.unlocked` / `credits.balance.low`.
  A replay finds the row and changes nothing. A new user gets an account with its signup credits first.
- `credits` in `billing.pack.refunded` is CUMULATIVE: the credits refunded for that purchase so far
  (billing derives it from Stripe's `charge.refunded`, whose `amount_refunded` is cumulative). Credits
  claws back the difference between it and what it has already accounted for (ledger
  `refund_clawback`, reference `refund:<purchase_id>:<cumulative>`), as far as the available balance
  allows; the rest is recorded as `credits_owed`, which later purchases pay first (ledger
  `refund_clawback`, reference `debt:<purchase_id>`). A replay or a stale, smaller cumulative value
  changes nothing. A refund that arrives before its purchase is retried (the queue's delivery limit
  dead-letters it if the purchase never comes).
- A message that is not JSON or does not validate is a PoisonMessage: it goes to the dead-letter queue
  at once and the next message is processed normally.
"""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from services.credits.ids import valid_user_id
from services.credits.metrics import CONSUMER_OUTCOMES
from services.credits.purchases import Purchases
from shared.broker import PoisonMessage, parse_json
from shared.events import PackPurchased, PackRefunded

log = logging.getLogger("credits.consumers")

QUEUE = "credits.billing-events"
ROUTING_KEYS = (PackPurchased.routing_key, PackRefunded.routing_key)


class BillingEventsConsumer:
    def __init__(self, purchases: Purchases) -> None:
        self.purchases = purchases

    async def handle(self, message: AbstractIncomingMessage) -> None:
        data = parse_json(message)
        event_type = data.get("event_type") or message.routing_key or message.type
        try:
            if event_type == PackPurchased.routing_key:
                purchased = PackPurchased.model_validate(data)
            elif event_type == PackRefunded.routing_key:
                refunded = PackRefunded.model_validate(data)
            else:
                CONSUMER_OUTCOMES.labels(str(event_type)[:64], "poison").inc()
                raise PoisonMessage(f"unexpected event type {event_type!r}")
        except ValidationError as exc:
            CONSUMER_OUTCOMES.labels(str(event_type)[:64], "poison").inc()
            raise PoisonMessage(f"invalid {event_type}: {exc.error_count()} error(s)") from exc
        user_id = purchased.user_id if event_type == PackPurchased.routing_key else refunded.user_id
        if not valid_user_id(user_id):
            CONSUMER_OUTCOMES.labels(event_type, "poison").inc()
            raise PoisonMessage("invalid user_id")
        try:
            if event_type == PackPurchased.routing_key:
                applied = await self.purchases.apply_purchase(purchased)
            else:
                applied = await self.purchases.apply_refund(refunded)
        except Exception:
            CONSUMER_OUTCOMES.labels(event_type, "retried").inc()
            raise
        CONSUMER_OUTCOMES.labels(event_type, "applied" if applied else "duplicate").inc()
        if applied and event_type == PackPurchased.routing_key:
            log.info(
                "purchase %s applied: %s bought %s, +%d credits",
                purchased.purchase_id,
                purchased.user_id,
                purchased.pack,
                purchased.credits,
            )
        elif applied:
            log.info("refund of purchase %s applied for %s", refunded.purchase_id, refunded.user_id)
