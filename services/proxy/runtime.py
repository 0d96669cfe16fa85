"""The proxy's long-lived objects (pools, caches, the meter), built once per process from the settings
and closed at its end. The app (`app.py`) and the worker use them; route modules import this type,
never the app."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from shared.holds.fast_path import RedisHolds

from .callers import Authenticator
from .client_watch import ClientWatch
from .config import ProxySettings
from .downstream import BillingClient, CreditsClient
from .metering import Meter
from .pricing import PricingTable
from .upstream import Upstream


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

    async def aclose(self) -> None:
        self.client_watch.close()
        clients: list[Any] = [self.credits, self.billing, self.upstream]
        if self.meter.redis_holds is not None:
            clients.append(self.meter.redis_holds)
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
