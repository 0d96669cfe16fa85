"""Prometheus metrics of the credits service."""

from __future__ import annotations

from prometheus_client import Counter

CREDITS_RESERVED = Counter("credits_reserved_total", "Credits placed on hold")
CREDITS_COMMITTED = Counter("credits_committed_total", "Credits charged by commits")
CREDITS_RELEASED = Counter("credits_released_total", "Held credits returned by releases and partial commits")
CREDITS_EXPIRED = Counter("credits_expired_total", "Held credits returned by expiry")
RESERVATIONS = Counter("credits_reservations_total", "Reserve attempts by outcome", ["outcome"])
PURCHASES_APPLIED = Counter("credits_purchases_applied_total", "Purchases credited")
REFUNDS_APPLIED = Counter("credits_refunds_applied_total", "Refund claw-backs applied")
BALANCE_LOW_EVENTS = Counter("credits_balance_low_events_total", "credits.balance.low events recorded")
CONSUMER_OUTCOMES = Counter(
    "credits_consumer_messages_total", "Billing messages by outcome", ["event_type", "outcome"]
)
REDIS_REBUILDS = Counter("credits_redis_rebuilds_total", "Per-user Redis state rebuilt from PostgreSQL")
REDIS_CAUGHT_UP = Counter(
    "credits_redis_caught_up_total",
    "Redis balances found behind PostgreSQL (a sync lost) and brought forward",
)
PENDING_SETTLEMENTS_APPLIED = Counter(
    "credits_pending_settlements_applied_total",
    "Settlements proxies left in Redis (credits unreachable, or the proxy stopping) applied by credits",
)
ORPHAN_HOLDS_DROPPED = Counter(
    "credits_orphan_holds_dropped_total", "Redis-only holds dropped by the sweeper"
)

# Children resolved once: labels() costs a dictionary lookup under a lock on every call.
RESERVATIONS_HELD = RESERVATIONS.labels("held")
RESERVATIONS_INSUFFICIENT = RESERVATIONS.labels("insufficient")
RESERVATIONS_REPLAYED = RESERVATIONS.labels("replayed")
