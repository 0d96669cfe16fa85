"""Holds placed straight in credits' Redis with `reserve.lua` (the proxy's fast path).

The keys, the scripts and their replies are `protocol.py`'s, shared with credits' Redis adapter
(`services/credits/holds.py`), so the two sides cannot drift apart.

A hold placed here exists only in Redis until the credits service records it in PostgreSQL
(`POST /v1/reservations/batch`, action "hold"). Until then it behaves like a hold whose process died
mid-reserve: if it is never recorded, the first credits-service script to meet it past its deadline
plus the grace period drops the user's keys, the account is rebuilt from PostgreSQL without it, and
the credits come back; nothing reaches the ledger. Only the plain case runs here (the account is
loaded and covers the amount); everything else (an account to rebuild, too few credits, idempotency
keys, Redis unreachable) answers None and the caller goes through the credits service's HTTP API.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.holds.protocol import (
    DEFAULT_NAMESPACE,
    RESERVE,
    ReserveStatus,
    pending_index_key,
    pending_key,
    pending_shard,
    reserve_outcome,
    settlement_entry,
    user_keys_with_pending,
)
from shared.redis_client import REDIS_ERRORS, AnyRedis, redis_client
from shared.settings import RedisSettings

log = logging.getLogger("shared.holds.fast_path")

REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (*REDIS_ERRORS, OSError, TimeoutError)
_HELD = ReserveStatus.HELD  # looked up once (an enum member's lookup costs 0.1 µs on Python 3.11)


@dataclass(frozen=True, slots=True)
class PlacedHold:
    reservation_id: str
    user_id: str
    amount: int
    available: int  # the user's credits available once this hold is placed
    epoch: str  # the account's load epoch the hold was placed under
    deadline_ms: int

    def record(self, kind: str = "usage") -> dict[str, Any]:
        """The item that asks credits to record this hold (`POST /v1/reservations/batch`)."""
        return {
            "action": "hold",
            "reservation_id": self.reservation_id,
            "user_id": self.user_id,
            "amount": self.amount,
            "epoch": self.epoch,
            "deadline_ms": self.deadline_ms,
            "kind": kind,
        }


class RedisHolds:
    """Places holds with `reserve.lua` against the credits service's Redis and key namespace."""

    def __init__(
        self,
        client: AnyRedis,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        ttl_seconds: int = 600,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.ttl_ms = ttl_seconds * 1000
        # After a failure Redis is left alone this long: every request meanwhile goes to the credits
        # service at once instead of each paying for its own failed attempt.
        self.retry_after_seconds = 1.0
        self._skip_until = 0.0
        # The longest a request waits for Redis (a connection, the handshake, the answer) before the
        # credits service takes over. Generous: a script that ran but whose answer was given up on
        # holds credits that nobody records until its deadline.
        self.answer_timeout_seconds = 3.0

    @classmethod
    def from_settings(
        cls, settings: RedisSettings, *, max_connections: int = 64, **kwargs: Any
    ) -> RedisHolds:
        """Holds in the Redis (single node or Cluster) and key namespace `settings` name."""
        # A blocking pool: a burst waits (up to a second) for one of a few connections rather than
        # opening hundreds; then the credits service takes over. A Redis that cannot be reached
        # costs at most the connect timeout (which also covers the handshake); `place` bounds the rest.
        # No socket timeout: `place` bounds each whole call (a cancelled call drops its connection),
        # and redis-py runs every send under a timeout of its own as a separate task, which showed
        # in the proxy's profile.
        client = redis_client(
            settings,
            max_connections=max_connections,
            pool_timeout=1.0,
            socket_connect_timeout=2.0,
            socket_timeout=None,
        )
        return cls(client, namespace=settings.redis_namespace, **kwargs)

    async def place(self, user_id: str, amount: int) -> PlacedHold | None:
        """Holds `amount` of the user's credits, or None when the credits service must decide."""
        if self._skip_until and time.monotonic() < self._skip_until:
            return None
        now_ms = int(time.time() * 1000)
        reservation_id = str(uuid.uuid4())
        deadline_ms = now_ms + self.ttl_ms
        try:
            async with asyncio.timeout(self.answer_timeout_seconds):
                reply = await RESERVE(
                    self.client,
                    # The record goes into the user's pending hash in the same script: what this
                    # hold is never lives only in this process (see `park`).
                    user_keys_with_pending(self.namespace, user_id),
                    # No hold counts as dead here (cut-off 0): a hold past its deadline makes the
                    # scripts drop the account for a rebuild, and that is the credits service's to
                    # judge, by its own clock and grace period. Counted, a dead hold only makes
                    # this path refuse sooner, and the credits service then clears it.
                    (reservation_id, amount, "", "exact", deadline_ms, 0, "usage"),
                )
        except REDIS_UNAVAILABLE:
            self._skip_until = time.monotonic() + self.retry_after_seconds
            log.warning("placing a hold in Redis failed; asking the credits service", exc_info=True)
            return None
        self._skip_until = 0.0
        outcome = reserve_outcome(reply)
        if outcome.status is not _HELD:
            return None
        return PlacedHold(
            reservation_id, user_id, outcome.held, outcome.available, outcome.epoch, deadline_ms
        )

    async def park(self, user_id: str, items: Sequence[tuple[str, dict[str, Any] | None]]) -> None:
        """Leaves what this proxy could not deliver to credits in credits' Redis, for credits to
        apply (`PendingSettlements.drain_pending`): per (reservation_id, settlement item or None). None: only
        the hold's record, which reserve.lua already wrote there, so the user is just listed. Raises
        when Redis fails (then the caller keeps the items)."""
        settlements = dict(settlement_entry(rid, item) for rid, item in items if item is not None)
        index = pending_index_key(self.namespace, pending_shard(user_id))
        async with asyncio.timeout(self.answer_timeout_seconds):
            if settlements:
                await self.client.hset(pending_key(self.namespace, user_id), mapping=settlements)  # type: ignore[arg-type]
            # Listed after the write: a sweeper that reads the list finds the settlement.
            await self.client.zincrby(index, 1, user_id)

    async def aclose(self) -> None:
        await self.client.aclose()  # type: ignore[attr-defined]  # stubs predate redis-py 5
