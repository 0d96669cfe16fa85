"""Billing refuses configurations that would let anyone credit an account or pick where customers are
sent (docs/configuration.md): a Stripe key without its webhook signing secret, production without PUBLIC_BASE_URL."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.billing.config import BillingSettings
from tests.support.servers import REPO_ROOT, free_port


def start_billing(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m services.billing` with `env`; it must exit on its own (a server would time out)."""
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")},
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "services.billing"],
        cwd=REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_stripe_key_without_a_webhook_secret_refuses_to_start() -> None:
    # Before: billing fell back to the public development secret and verified forged webhooks with it.
    done = start_billing({"STRIPE_API_KEY": "sk_test_real_looking_key", "ENVIRONMENT": "development"})
    assert done.returncode != 0
    assert "STRIPE_WEBHOOK_SECRET" in done.stderr, done.stderr
    with pytest.raises(ValidationError, match="STRIPE_WEBHOOK_SECRET"):
        BillingSettings(stripe_api_key="sk_test_x")
    with_secret = BillingSettings(stripe_api_key="sk_test_x", stripe_webhook_secret="whsec_real")
    assert with_secret.webhook_secret == "whsec_real"
    # Local test mode (no key) still signs its own test webhooks with the development secret.
    assert BillingSettings().test_mode


def test_production_needs_public_base_url_and_return_pages_use_it() -> None:
    prod = {
        "environment": "production",
        "internal_token": "prod-internal",
        "admin_token": "prod-admin",
        "stripe_api_key": "sk_live_x",
        "stripe_webhook_secret": "whsec_x",
    }
    with pytest.raises(ValidationError, match="PUBLIC_BASE_URL"):
        BillingSettings(**prod)
    settings = BillingSettings(**prod, public_base_url="https://gateway.example.com/")
    assert settings.success_url() == "https://gateway.example.com/?checkout=success"
    assert settings.cancel_url() == "https://gateway.example.com/?checkout=cancel"
    assert BillingSettings().success_url() == "http://127.0.0.1:8000/?checkout=success"
