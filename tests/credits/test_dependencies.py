"""With Redis unreachable the service says so: /readyz is 503 and a reserve is refused with 503."""

from __future__ import annotations

import httpx

from tests.credits.helpers import Checker, assert_envelope
from tests.support.credits_service import CreditsService, running_credits


async def test_redis_down_is_503_and_changes_nothing(
    credits: CreditsService,
    credits_database_url: str,
    broker_namespace: str,
    check: Checker,
    client: httpx.AsyncClient,
    user_id: str,
) -> None:
    assert (await client.post("/v1/users", json={"user_id": user_id})).status_code == 201
    before = await check.consistent(user_id, client)
    async with (
        running_credits(
            database_url=credits_database_url,
            redis_url="redis://127.0.0.1:1/0",  # nothing listens there
            broker_namespace=broker_namespace,
            run_consumer=False,
            run_background_tasks=False,
            auto_migrate=False,
        ) as broken,
        httpx.AsyncClient(base_url=broken.url, headers=broken.headers, timeout=30) as c,
    ):
        ready = await c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("failing")
        assert ready.json()["checks"]["database"] == "ok"
        assert_envelope(
            await c.post("/v1/reservations", json={"user_id": user_id, "amount": 1}),
            503,
            "service_unavailable",
        )
        assert_envelope(await c.get(f"/v1/users/{user_id}/credits"), 503, "service_unavailable")
    assert await check.consistent(user_id, client) == before
