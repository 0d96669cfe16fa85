"""Settings of the credits service (docs/configuration.md)."""

from __future__ import annotations

from typing import ClassVar

from shared.settings import DatabaseSettings


class CreditsSettings(DatabaseSettings):
    service_name: ClassVar[str] = "credits"
    default_port: ClassVar[int] = 8002
    secret_fields: ClassVar[tuple[str, ...]] = ("internal_token", "admin_token")

    redis_url: str = "redis://localhost:6379/0"
    # First part of every Redis key ("credits:{<user_id>}:acct"); lets two deployments share one Redis.
    redis_namespace: str = "credits"
    signup_credits: int = 10
    reservation_ttl_seconds: int = 600
    # Longest TTL a caller may ask for (seconds).
    max_reservation_ttl_seconds: int = 7 * 24 * 3600
    # How often the sweeper looks for expired holds and unpublished outbox rows.
    sweep_interval_seconds: float = 1.0
    # A hold still in Redis this long after its deadline missed its end (its process died): the user's Redis
    # state is then rebuilt from PostgreSQL.
    orphan_grace_seconds: float = 5.0
    # Number of deadline sorted sets; each is its own key (and Cluster slot).
    deadline_shards: int = 16
    # Largest group of holds persisted in one PostgreSQL transaction.
    hold_batch_max: int = 512
    db_pool_size: int = 20
    consumer_prefetch: int = 16
    # Run the background sweeper and outbox relay (tests may turn them off and drive them by hand).
    run_background_tasks: bool = True
    run_consumer: bool = True
