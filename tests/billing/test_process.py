"""`python -m services.billing` as a real process, configured only by environment variables."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from tests.support.servers import service_process


def test_billing_starts_as_a_process_in_local_test_mode(
    make_database_url: Callable[[str], str], rabbitmq_url: str, broker_namespace: str
) -> None:
    env = {
        "DATABASE_URL": make_database_url("billing_process"),
        "RABBITMQ_URL": rabbitmq_url,
        "BROKER_NAMESPACE": broker_namespace,
        "STRIPE_API_KEY": "",
        "STRIPE_WEBHOOK_SECRET": "",
        "PACKS_FILE": "deploy/packs.legacy.yaml",
    }
    with service_process("services.billing", env) as (url, _):
        packs = httpx.get(f"{url}/v1/packs", timeout=10).json()["data"]
        assert [p["id"] for p in packs] == ["basic", "premium", "pro", "enterprise"]
        created = httpx.post(
            f"{url}/v1/checkout/sessions",
            json={"user_id": "process-user", "pack": "premium"},
            headers={"Authorization": "Bearer dev-internal-token"},
            timeout=10,
        )
        assert created.status_code == 201
        assert "/test-checkout/" in created.json()["url"]
        page = httpx.get(f"{url}/test-checkout/{created.json()['session_id']}", timeout=10)
        assert "TEST MODE" in page.text and "$24.99" in page.text
