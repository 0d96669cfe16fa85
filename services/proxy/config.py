"""Proxy settings (docs/configuration.md), read from the environment."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from shared.settings import RedisSettings, SharedSettings


class ProxySettings(SharedSettings, RedisSettings):
    service_name: ClassVar[str] = "proxy"
    default_port: ClassVar[int] = 8000
    secret_fields: ClassVar[tuple[str, ...]] = ("internal_token", "user_token_secret")

    hands_out_urls: ClassVar[bool] = True

    credits_url: str = "http://127.0.0.1:8002"
    billing_url: str = "http://127.0.0.1:8001"

    openai_api_key: str | None = None
    openai_base_url: str = "https://api.openai.com/v1"
    upstream_timeout_seconds: float = 60.0
    upstream_max_connections: int = 512
    # A streaming client that reads nothing for this long is cut off (its request charged, the
    # upstream call closed): a stalled reader must not keep an upstream call and its hold alive.
    client_stall_seconds: float = Field(default=60.0, gt=0)

    pricing_file: str | None = None
    # Redis, shared with credits: the worker's job records, and the holds of the fast path.
    redis_url: str = "redis://localhost:6379/0"
    # Holds are placed straight in credits' Redis with the reserve.lua credits runs, under credits' key
    # namespace (credits' REDIS_NAMESPACE), and recorded at credits in the background. Off: every
    # hold is an HTTP call to credits. A REDIS_URL that is not credits' Redis costs only speed:
    # the accounts are never found loaded there, so every hold goes to credits.
    holds_in_redis: bool = True
    redis_namespace: str = "credits"
    # Lifetime of a hold placed in Redis (credits' RESERVATION_TTL_SECONDS for the holds it places).
    reservation_ttl_seconds: int = 600

    # How long a batch of settlements (commits, releases, records of holds placed in Redis) waits for
    # more before it goes to credits. Settling happens after the response, so users do not wait for
    # it (a request whose hold is refused meanwhile first waits for its user's settlements), while
    # fewer, larger batches leave the cores to the requests in flight.
    settle_linger_ms: float = Field(default=5.0, ge=0, le=1000)

    # A verified API key is trusted this long; a revoked key therefore stops working within it.
    api_key_cache_seconds: float = 2.0
    # Unknown keys are remembered this long, so hammering one bad key does not hammer credits.
    api_key_negative_cache_seconds: float = 2.0
    packs_cache_seconds: float = 60.0
    # Timeout for calls to credits and billing.
    downstream_timeout_seconds: float = 5.0
    # Concurrent connections to credits (and to billing); further calls wait for a free one, which
    # keeps a burst at the gateway from becoming a burst of connections at credits.
    downstream_max_connections: int = 100

    # The ai.requests worker (docs/messages.md, AI jobs).
    worker_enabled: bool = True
    worker_prefetch: int = 16
    worker_max_attempts: int = 3
    worker_retry_base_seconds: float = 0.5
    # How long a finished job's outcome is remembered for redeliveries.
    worker_record_ttl_seconds: int = 7 * 24 * 3600
    shutdown_grace_seconds: float = 15.0
