"""Real services for the proxy's tests: credits and billing in-process (real PostgreSQL, Redis,
RabbitMQ), the stand-in as the upstream, and the proxy itself; the official openai SDK is the client."""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from services.credits.app import create_app as create_credits_app
from services.credits.config import CreditsSettings
from services.standin import StandinServer, run_in_thread
from shared.broker import Topology
from tests.support.billing_service import running_billing
from tests.support.broker import delete_namespace
from tests.support.proxy_service import RunningProxy, running_proxy
from tests.support.servers import serve_app

ADMIN = {"Authorization": "Bearer dev-admin-token"}
INTERNAL = {"Authorization": "Bearer dev-internal-token"}
PRICING = """
default: {per_request: 1}
models:
  gpt-4o-mini: {per_1k_input_tokens: 2, per_1k_output_tokens: 8, max_reserve: 40}
  dall-e-3: {per_request: 5}
  # One credit per token in and out, so a test can predict a charge from the events it saw.
  standin-drop-after-5: {per_1k_input_tokens: 1000, per_1k_output_tokens: 1000, max_reserve: 100}
  standin-trickle-30-words-60: {per_1k_input_tokens: 1000, per_1k_output_tokens: 1000, max_reserve: 100}
"""


@pytest.fixture(scope="session")
async def broker_namespace(run_id: str, rabbitmq_url: str) -> AsyncIterator[str]:
    """The proxy's stack gets a broker namespace of its own: its long-lived credits service would
    otherwise consume the billing messages that other packages' tests publish for their own."""
    namespace = f"test-{run_id}-proxy"
    yield namespace
    await delete_namespace(rabbitmq_url, namespace)


@pytest.fixture(scope="session")
def topology(broker_namespace: str) -> Topology:
    # Overridden with broker_namespace: a session fixture's cached value ignores an overridden dependency.
    return Topology(broker_namespace)


@contextlib.asynccontextmanager
async def running_credits(
    database_url: str, redis_url: str, rabbitmq_url: str, namespace: str, redis_cluster: bool = False
) -> AsyncIterator[str]:
    settings = CreditsSettings(
        database_url=database_url,
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        rabbitmq_url=rabbitmq_url,
        broker_namespace=namespace,
        signup_credits=10,
    )
    async with serve_app(create_credits_app(settings)) as url:
        yield url


@pytest.fixture(scope="session")
def standin() -> Iterator[StandinServer]:
    with run_in_thread() as server:
        yield server


@pytest.fixture(scope="package")
async def credits_url(
    make_database_url, redis_url, redis_cluster, rabbitmq_url, broker_namespace
) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    async with running_credits(
        make_database_url("proxy_credits"), redis_url, rabbitmq_url, broker_namespace, redis_cluster
    ) as url:
        yield url


@pytest.fixture(scope="package")
async def billing_url(make_database_url, rabbitmq_url, broker_namespace) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    async with running_billing(
        database_url=make_database_url("proxy_billing"),
        rabbitmq_url=rabbitmq_url,
        broker_namespace=broker_namespace,
    ) as billing:
        yield billing.url


@pytest.fixture(scope="session")
def pricing_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("pricing") / "pricing.yaml"
    path.write_text(PRICING)
    return str(path)


@pytest.fixture(scope="package")
async def proxy(  # type: ignore[no-untyped-def]
    credits_url, billing_url, standin, pricing_file, redis_url, redis_cluster, rabbitmq_url, broker_namespace
) -> AsyncIterator[RunningProxy]:
    async with running_proxy(
        credits_url=credits_url,
        billing_url=billing_url,
        upstream_base_url=standin.base_url,
        redis_url=redis_url,
        redis_cluster=redis_cluster,
        rabbitmq_url=rabbitmq_url,
        broker_namespace=broker_namespace,
        pricing_file=pricing_file,
        upstream_timeout_seconds=2.0,
        worker_retry_base_seconds=0.05,
    ) as running:
        yield running


class Credits:
    """Direct access to the credits service, to set up users and assert balances and ledger rows."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        # Usage rows written while setting a user up (spending the signup surplus), not by a test.
        self._setup_usage: dict[str, int] = {}

    async def user(self, credits: int = 0, *, unlocked: bool = False) -> str:
        user_id = f"u-{uuid.uuid4().hex[:12]}"
        r = await self.http.post("/v1/users", json={"user_id": user_id}, headers=INTERNAL)
        assert r.status_code in (200, 201), r.text
        signup = r.json()["credits_remaining"]
        if unlocked:
            r = await self.http.post(
                "/v1/admin/migrations/subscriptions",
                json={"users": [{"user_id": user_id, "tier": "pro"}]},
                headers=ADMIN,
            )
            assert r.status_code == 200, r.text
        account = await self.account(user_id)
        delta = credits - account["credits_remaining"]
        if delta > 0:
            r = await self.http.post(
                f"/v1/admin/users/{user_id}/grants", json={"credits": delta, "reason": "test"}, headers=ADMIN
            )
            assert r.status_code in (200, 201), r.text
        elif delta < 0:
            # Spend the surplus (signup bonus, migration) through a committed reservation.
            r = await self.http.post(
                "/v1/reservations", json={"user_id": user_id, "amount": -delta}, headers=INTERNAL
            )
            assert r.status_code == 201, r.text
            rid = r.json()["reservation_id"]
            r = await self.http.post(f"/v1/reservations/{rid}/commit", json={}, headers=INTERNAL)
            assert r.status_code == 200, r.text
        assert (await self.account(user_id))["credits_remaining"] == credits
        del signup
        self._setup_usage[user_id] = len(await self.usage(user_id))
        return user_id

    async def account(self, user_id: str) -> dict[str, Any]:
        r = await self.http.get(f"/v1/users/{user_id}/credits", headers=INTERNAL)
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def ledger(self, user_id: str) -> list[dict[str, Any]]:
        r = await self.http.get(f"/v1/users/{user_id}/transactions", params={"limit": 100}, headers=INTERNAL)
        assert r.status_code == 200, r.text
        return list(r.json()["data"])

    async def usage(self, user_id: str) -> list[int]:
        """Credits of the `usage` ledger rows written since the user was set up, newest first."""
        rows = [-e["amount"] for e in await self.ledger(user_id) if e["type"] == "usage"]
        setup = self._setup_usage.get(user_id, 0)
        return rows[: len(rows) - setup]

    async def api_key(self, user_id: str) -> str:
        r = await self.http.post(f"/v1/users/{user_id}/api-keys", json={"name": "test"}, headers=INTERNAL)
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    async def settled(self, user_id: str, remaining: int, usage_total: int | None = None) -> dict[str, Any]:
        """Waits until no hold is left and the balance is `remaining` (commits run after responses)."""
        from tests.conftest import eventually

        async def check() -> dict[str, Any] | None:
            account = await self.account(user_id)
            if account["credits_reserved"] == 0 and account["credits_remaining"] == remaining:
                if usage_total is None or sum(await self.usage(user_id)) == usage_total:
                    return account
            return None

        try:
            return await eventually(check, timeout=15)  # type: ignore[return-value]
        except AssertionError:
            raise AssertionError(
                f"not settled: {await self.account(user_id)} usage={await self.usage(user_id)}"
            ) from None


@pytest.fixture(scope="package")
async def credits(credits_url: str) -> AsyncIterator[Credits]:
    async with httpx.AsyncClient(base_url=credits_url, timeout=30) as http:
        yield Credits(http)


def sdk_for(
    proxy: RunningProxy, user_id: str | None = None, *, api_key: str | None = None, **kwargs: Any
) -> AsyncOpenAI:
    """The openai SDK against `proxy`: for a user with the internal token, or with an API key."""
    return AsyncOpenAI(
        base_url=proxy.base_url,
        api_key=api_key or "dev-internal-token",
        default_headers={"X-User-Id": user_id} if user_id else {},
        max_retries=0,
        timeout=kwargs.pop("timeout", 30),
        **kwargs,
    )


@contextlib.asynccontextmanager
async def another_proxy(
    credits_url: str, upstream_base_url: str, **overrides: Any
) -> AsyncIterator[RunningProxy]:
    """A proxy of a test's own (other settings, another upstream or Redis), without the worker."""
    async with running_proxy(
        credits_url=credits_url, upstream_base_url=upstream_base_url, worker_enabled=False, **overrides
    ) as running:
        yield running


@pytest.fixture
def sdk(proxy: RunningProxy) -> Callable[..., AsyncOpenAI]:
    """sdk(user_id) acts for a user with the internal token; sdk(api_key=...) with an API key."""
    return functools.partial(sdk_for, proxy)


@pytest.fixture
async def gateway(proxy: RunningProxy) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        yield http
