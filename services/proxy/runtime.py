"""The proxy's long-lived objects (pools, caches, the meter, the worker's Redis and broker connection),
built once per process from the settings, started and closed here. The app (`app.py`) composes them
with the routes and the worker; route modules and the worker import this type, never the app."""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractRobustConnection

from shared.broker import connect
from shared.holds.fast_path import RedisHolds
from shared.redis_client import AnyRedis, probe, redis_client
from shared.web import ReadinessCheck

from .callers import Authenticator
from .client_watch import ClientWatch
from .config import ProxySettings
from .downstream import BillingClient, CreditsClient
from .metering import Meter
from .pricing import PricingTable
from .upstream import Upstream

log = logging.getLogger("proxy.runtime")


@dataclass
class Proxy:
    """Everything a request needs, built once per process."""

    settings: ProxySettings
    pricing: PricingTable
    credits: CreditsClient
    billing: BillingClient
    upstream: Upstream
    auth: Authenticator
    meter: Meter
    # Clients that leave while their requests wait for the upstream.
    client_watch: ClientWatch = field(default_factory=lambda: ClientWatch())
    # Opened by `start`: the worker's job records (REDIS_CLUSTER picks the kind of client, like for
    # the holds) and the broker connection (None when RabbitMQ was unreachable at start).
    redis: AnyRedis | None = None
    broker: AbstractRobustConnection | None = None

    @classmethod
    def build(cls, settings: ProxySettings) -> Proxy:
        credits = CreditsClient(
            settings.credits_url, settings.internal_token, settings.downstream_timeout_seconds
        )
        billing = BillingClient(
            settings.billing_url,
            settings.internal_token,
            settings.downstream_timeout_seconds,
            settings.packs_cache_seconds,
        )
        redis_holds = None
        if settings.holds_in_redis:
            redis_holds = RedisHolds.from_settings(settings, ttl_seconds=settings.reservation_ttl_seconds)
        return cls(
            settings=settings,
            pricing=PricingTable.load(settings.pricing_file),
            credits=credits,
            billing=billing,
            upstream=Upstream(
                settings.openai_base_url,
                settings.openai_api_key,
                settings.upstream_timeout_seconds,
                settings.upstream_max_connections,
            ),
            auth=Authenticator(
                credits,
                internal_token=settings.internal_token,
                user_token_secret=settings.user_token_secret,
                positive_ttl=settings.api_key_cache_seconds,
                negative_ttl=settings.api_key_negative_cache_seconds,
            ),
            meter=Meter(
                credits,
                settings.low_balance_threshold,
                redis_holds,
                settle_linger_seconds=settings.settle_linger_ms / 1000,
                hold_ttl_seconds=settings.reservation_ttl_seconds,
            ),
        )

    async def start(self) -> None:
        self.redis = redis_client(self.settings)
        try:
            self.broker = await connect(self.settings.rabbitmq_url, "proxy")
        except Exception:
            log.exception("cannot reach RabbitMQ at start; the worker is off until restart")

    def readiness_checks(self) -> dict[str, ReadinessCheck]:
        assert self.redis is not None, "started"
        return {
            "credits": self._credits_ready,
            "broker": self._broker_ready,
            "redis": functools.partial(probe, self.redis, self.settings.redis_namespace),
        }

    async def _credits_ready(self) -> None:
        response = await self.credits.call(b"GET", "/healthz")
        if response.status != 200:
            raise RuntimeError(f"credits answered {response.status}")

    async def _broker_ready(self) -> None:
        if self.broker is None or self.broker.is_closed:
            raise RuntimeError("no broker connection")

    async def aclose(self, drain_seconds: float) -> None:
        """Settles what it can within `drain_seconds` (sent, or parked in credits' Redis when credits is
        gone), then closes everything `build` and `start` opened."""
        await self.meter.drain(drain_seconds)
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.close()
        if self.redis is not None:
            await self.redis.aclose()  # type: ignore[attr-defined]
        self.client_watch.close()
        clients: list[Any] = [self.credits, self.billing, self.upstream]
        if self.meter.redis_holds is not None:
            clients.append(self.meter.redis_holds)
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
