"""Settings shared by every service, read from the environment (docs/configuration.md)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRETS: dict[str, str] = {
    "internal_token": "dev-internal-token",
    "admin_token": "dev-admin-token",
    "user_token_secret": "dev-user-token-secret",
}

# Where `make run` serves the gateway (docs/configuration.md: PUBLIC_BASE_URL's development default).
DEV_PUBLIC_BASE_URL = "http://127.0.0.1:8000"


class SharedSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Subclasses name themselves; it picks the default port and database.
    service_name: ClassVar[str] = "service"
    default_port: ClassVar[int] = 8000
    # Secrets a service really uses; only these are checked in production.
    secret_fields: ClassVar[tuple[str, ...]] = ("internal_token",)
    # Services that hand out URLs (proxy, billing) need PUBLIC_BASE_URL in production (docs/configuration.md).
    hands_out_urls: ClassVar[bool] = False

    host: str = "127.0.0.1"
    port: int = 0
    environment: str = "development"
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/"
    # Suffix for every exchange and queue name; empty in real deployments. Lets test runs share a broker.
    broker_namespace: str = ""
    internal_token: str = DEV_SECRETS["internal_token"]
    admin_token: str = DEV_SECRETS["admin_token"]
    user_token_secret: str = DEV_SECRETS["user_token_secret"]
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    # Request line and headers; a larger request is refused with 431 (shared.http_limits).
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    # A request's headers must arrive within this of its first byte (or of the connection), and its
    # body within the next; a slower client is answered 408 and disconnected.
    header_read_timeout_seconds: float = Field(default=10.0, gt=0)
    body_read_timeout_seconds: float = Field(default=60.0, gt=0)
    low_balance_threshold: int = 5
    log_level: str = "INFO"
    log_json: bool = True
    # The gateway's public address: the only base of URLs handed out (checkout return pages,
    # redirects), never a request's Host header. Development default: the local gateway.
    public_base_url: str = ""

    @model_validator(mode="after")
    def _defaults_and_production_secrets(self) -> SharedSettings:
        if not self.port:
            self.port = self.default_port
        if self.environment.lower() == "production":
            still_default = [
                name.upper()
                for name in self.secret_fields
                if name in DEV_SECRETS and getattr(self, name) == DEV_SECRETS[name]
            ]
            if still_default:
                raise ValueError(
                    "refusing to start in production with development secrets: " + ", ".join(still_default)
                )
            if self.hands_out_urls and not self.public_base_url:
                raise ValueError(
                    "PUBLIC_BASE_URL is required in production: the gateway's public address, the base of "
                    "every URL this service hands out"
                )
        if self.public_base_url and not self.public_base_url.startswith(("http://", "https://")):
            raise ValueError("PUBLIC_BASE_URL must be an absolute http(s) URL")
        self.public_base_url = (self.public_base_url or DEV_PUBLIC_BASE_URL).rstrip("/")
        return self


class DatabaseSettings(SharedSettings):
    database_url: str = ""
    auto_migrate: bool = True
    # PostgreSQL connections per process: a pool of DB_POOL_SIZE kept open plus up to DB_MAX_OVERFLOW
    # more under load (credits adds its hot-path pool, DB_HOT_POOL_SIZE). Budget for N replicas in
    # docs/scaling.md; past the pool a caller waits for a connection, it does not open one.
    db_pool_size: int = Field(default=5, ge=1)
    db_max_overflow: int = Field(default=2, ge=0)
    # DATABASE_URL is PgBouncer in transaction mode: no prepared-statement caches (a cached statement
    # belongs to one server connection, and the next transaction may run on another). Migrations
    # take a session-level advisory lock, so they must reach PostgreSQL directly (AUTO_MIGRATE=0 on
    # pooled replicas; see docs/scaling.md).
    db_pgbouncer: bool = False

    @model_validator(mode="after")
    def _default_database(self) -> DatabaseSettings:
        if not self.database_url:
            self.database_url = (
                f"postgresql+asyncpg://postgres@localhost:5432/credit_proxy_{self.service_name}"
            )
        return self


class RedisSettings(BaseSettings):
    """Redis as the credits service and the proxy reach it (docs/configuration.md)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    redis_url: str = "redis://localhost:6379/0"
    # REDIS_URL names any one node of a Redis Cluster (DB 0); the client finds the others.
    redis_cluster: bool = False
    # First part of every Redis key; lets two deployments (or test runs) share one Redis.
    redis_namespace: str = "credits"
    # Connections per Redis node per client; past them a command waits (up to the timeout) for one.
    redis_max_connections: int = Field(default=200, ge=1)
    redis_pool_timeout_seconds: float = Field(default=5.0, gt=0)

    @field_validator("redis_namespace")
    @classmethod
    def _no_braces(cls, value: str) -> str:
        # A brace would become the hash tag of every key and put them all in one Cluster slot.
        if "{" in value or "}" in value:
            raise ValueError("REDIS_NAMESPACE must not contain '{' or '}'")
        return value
