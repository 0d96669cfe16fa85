"""Billing settings (docs/configuration.md plus billing's own: portal and public URLs, outbox relay timing)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import model_validator

from shared.settings import DatabaseSettings

# Signs the local test checkout's webhooks when STRIPE_WEBHOOK_SECRET is unset (never in production).
DEV_WEBHOOK_SECRET = "whsec_dev_local_test_mode"


class BillingSettings(DatabaseSettings):
    service_name: ClassVar[str] = "billing"
    default_port: ClassVar[int] = 8001
    secret_fields: ClassVar[tuple[str, ...]] = ("internal_token", "admin_token")
    hands_out_urls: ClassVar[bool] = True

    stripe_api_key: str | None = None
    stripe_webhook_secret: str | None = None
    # Points the SDK at a Stripe-compatible server (tests); None means Stripe's own.
    stripe_api_base: str | None = None
    packs_file: str | None = None
    # Where Stripe sends the customer back: `?checkout=success` / `?checkout=cancel` are appended.
    # Unset: the portal at PUBLIC_BASE_URL.
    portal_url: str = ""
    # Billing's own address as a browser sees it; the local test checkout page lives under it.
    billing_public_url: str = "http://127.0.0.1:8001"
    outbox_poll_seconds: float = 1.0
    outbox_max_backoff_seconds: float = 30.0

    @model_validator(mode="after")
    def _stripe_in_production(self) -> BillingSettings:
        if self.environment.lower() == "production" and not self.stripe_api_key:
            raise ValueError("STRIPE_API_KEY is required in production (local test mode is for development)")
        if self.stripe_api_key and not self.stripe_webhook_secret:
            # The development secret is public: with real Stripe behind it, anyone could sign a
            # webhook that credits any account.
            raise ValueError(
                "STRIPE_WEBHOOK_SECRET is required when STRIPE_API_KEY is set (the signing secret of "
                "the webhook endpoint in Stripe's dashboard)"
            )
        if not self.portal_url:
            self.portal_url = f"{self.public_base_url}/"
        return self

    @property
    def test_mode(self) -> bool:
        """docs/api.md, Billing: without a Stripe key, checkout is served by billing's local test page."""
        return not self.stripe_api_key

    @property
    def webhook_secret(self) -> str:
        # In local test mode (no Stripe key) an unset secret falls back to the dev one, so the test
        # checkout signs and verifies with the same value; with a Stripe key it is required (above).
        return self.stripe_webhook_secret or DEV_WEBHOOK_SECRET

    def success_url(self) -> str:
        return _with_query(self.portal_url, "checkout=success")

    def cancel_url(self) -> str:
        return _with_query(self.portal_url, "checkout=cancel")


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"
