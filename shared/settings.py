"""Settings shared by every service, read from the environment (docs/configuration.md)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRETS: dict[str, str] = {
    "internal_token": "dev-internal-token",
    "admin_token": "dev-admin-token",
    "user_token_secret": "dev-user-token-secret",
}


class SharedSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # Subclasses name themselves; it picks the default port and database.
    service_name: ClassVar[str] = "service"
    default_port: ClassVar[int] = 8000
    # Secrets a service really uses; only these are checked in production.
    secret_fields: ClassVar[tuple[str, ...]] = ("internal_token",)

    host: str = "127.0.0.1"
    port: int = 0
    environment: str = "development"
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/"
    # Suffix for every exchange and queue name; empty in real deployments. Lets test runs share a broker.
    broker_namespace: str = ""
    internal_token: str = DEV_SECRETS["internal_token"]
    admin_token: str = DEV_SECRETS["admin_token"]
    user_token_secret: str = DEV_SECRETS["user_token_secret"]
    max_body_bytes: int = 10 * 1024 * 1024
    low_balance_threshold: int = 5
    log_level: str = "INFO"
    log_json: bool = True

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
        return self


class DatabaseSettings(SharedSettings):
    database_url: str = ""
    auto_migrate: bool = True

    @model_validator(mode="after")
    def _default_database(self) -> DatabaseSettings:
        if not self.database_url:
            self.database_url = (
                f"postgresql+asyncpg://postgres@localhost:5432/credit_proxy_{self.service_name}"
            )
        return self
