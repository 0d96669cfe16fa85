"""AMQP entrypoint: billing's purchase and refund events → the ledger (exactly once per purchase_id)."""

from __future__ import annotations

import logging

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from services.credits.ledger import Ledger, valid_user_id
from services.credits.metrics import CONSUMER_OUTCOMES
from shared.broker import PoisonMessage, parse_json
from shared.events import PackPurchased, PackRefunded

log = logging.getLogger("credits.consumers")

QUEUE = "credits.billing-events"
ROUTING_KEYS = (PackPurchased.routing_key, PackRefunded.routing_key)


class BillingEventsConsumer:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

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
                applied = await self.ledger.apply_purchase(purchased)
            else:
                applied = await self.ledger.apply_refund(refunded)
        except Exception:
            CONSUMER_OUTCOMES.labels(event_type, "retried").inc()
            raise
        CONSUMER_OUTCOMES.labels(event_type, "applied" if applied else "duplicate").inc()
