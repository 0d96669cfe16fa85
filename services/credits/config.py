"""Settings of the credits service (docs/configuration.md)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from shared.settings import DatabaseSettings, RedisSettings


class CreditsSettings(DatabaseSettings, RedisSettings):
    service_name: ClassVar[str] = "credits"
    default_port: ClassVar[int] = 8002
    secret_fields: ClassVar[tuple[str, ...]] = ("internal_token", "admin_token")

    signup_credits: int = 10
    reservation_ttl_seconds: int = 600
    # Longest TTL a caller may ask for (seconds).
    max_reservation_ttl_seconds: int = 7 * 24 * 3600
    # How often the sweeper looks for expired holds and unpublished outbox rows.
    sweep_interval_seconds: float = 1.0
    # A hold still in Redis this long after its deadline missed its end (its process died): the user's Redis
    # state is then rebuilt from PostgreSQL.
    orphan_grace_seconds: float = 5.0
    # A settlement a proxy left in Redis (credits unreachable, or the proxy stopping) is applied even
    # past its hold's deadline; the hold's deadline is first moved this far on, so the sweeper
    # does not expire it in between.
    late_settlement_seconds: int = 60
    # Number of deadline sorted sets; each is its own key (and Cluster slot).
    deadline_shards: int = 16
    # Largest group of holds persisted in one PostgreSQL transaction.
    hold_batch_max: int = 512
    # The hot path's raw asyncpg pool (hold batches, commits, releases), beside DB_POOL_SIZE.
    db_hot_pool_size: int = Field(default=8, ge=1)
    consumer_prefetch: int = 16
    # Run the background sweeper and outbox relay (tests may turn them off and drive them by hand).
    run_background_tasks: bool = True
    run_consumer: bool = True
