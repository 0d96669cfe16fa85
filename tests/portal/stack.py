"""The whole system in-process, as `make run` wires it: credits, billing in local test mode (its
public URL is where it really listens), the stand-in upstream, and the proxy in front of them.

Each stack gets its own broker namespace and Redis key namespace, so its credits consumer is the only
one that sees its billing's purchases (a purchase flows webhook → outbox → RabbitMQ → credits).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.standin import StandinServer, run_in_thread
from tests.support.billing_service import RunningBilling, running_billing
from tests.support.broker import delete_namespace
from tests.support.credits_service import CreditsService, running_credits
from tests.support.proxy_service import RunningProxy, running_proxy

# One credit per request by default; images cost 5, so a test can tell the two charges apart.
PRICING = """
default: {per_request: 1}
models:
  dall-e-3: {per_request: 5}
"""


@dataclass
class Stack:
    credits: CreditsService
    billing: RunningBilling
    proxy: RunningProxy
    standin: StandinServer

    async def account(self, user_id: str) -> dict[str, Any] | None:
        async with httpx.AsyncClient(base_url=self.credits.url, timeout=30) as http:
            r = await http.get(f"/v1/users/{user_id}/credits", headers=self.credits.headers)
        if r.status_code == 404:
            return None
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def ledger(self, user_id: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=self.credits.url, timeout=30) as http:
            r = await http.get(
                f"/v1/users/{user_id}/transactions", params={"limit": 100}, headers=self.credits.headers
            )
        assert r.status_code == 200, r.text
        return list(r.json()["data"])

    async def spend_all(self, user_id: str) -> None:
        """Spends the user's whole balance through the gateway (one credit per chat call)."""
        account = await self.account(user_id)
        assert account is not None
        headers = {"Authorization": f"Bearer {self.proxy.settings.internal_token}", "X-User-Id": user_id}
        async with httpx.AsyncClient(base_url=self.proxy.url, timeout=30) as http:
            for _ in range(account["credits_remaining"]):
                r = await http.post(
                    "/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    headers=headers,
                )
                assert r.status_code == 200, r.text


async def _start(
    stack: contextlib.AsyncExitStack,
    *,
    name: str,
    make_database_url: Callable[[str], str],
    redis_url: str,
    rabbitmq_url: str,
    namespace: str,
    pricing_file: Path,
) -> Stack:
    standin = stack.enter_context(run_in_thread())
    credits = await stack.enter_async_context(
        running_credits(
            database_url=make_database_url(f"{name}_credits"),
            redis_url=redis_url,
            rabbitmq_url=rabbitmq_url,
            broker_namespace=namespace,
            redis_namespace=f"credits-{name}",
            signup_credits=10,
        )
    )
    billing = await stack.enter_async_context(
        running_billing(
            database_url=make_database_url(f"{name}_billing"),
            rabbitmq_url=rabbitmq_url,
            broker_namespace=namespace,
        )
    )
    assert billing.settings.test_mode, "billing must run in local test mode (no Stripe key)"
    proxy = await stack.enter_async_context(
        running_proxy(
            credits_url=credits.url,
            billing_url=billing.url,
            upstream_base_url=standin.base_url,
            redis_url=redis_url,
            rabbitmq_url=rabbitmq_url,
            broker_namespace=namespace,
            pricing_file=str(pricing_file),
            worker_enabled=False,
        )
    )
    return Stack(credits=credits, billing=billing, proxy=proxy, standin=standin)


@contextlib.asynccontextmanager
async def running_stack(
    name: str,
    make_database_url: Callable[[str], str],
    redis_url: str,
    rabbitmq_url: str,
    broker_namespace: str,
    workdir: Path,
) -> AsyncIterator[Stack]:
    namespace = f"{broker_namespace}-{name}"
    pricing_file = workdir / "pricing.yaml"
    pricing_file.write_text(PRICING)
    try:
        # Billing must know its public URL before it listens, so its port is picked free and then
        # bound; on a busy machine another process can take it in between (uvicorn then exits).
        for attempt in range(3):
            exits = contextlib.AsyncExitStack()
            try:
                running = await _start(
                    exits,
                    name=name,
                    make_database_url=make_database_url,
                    redis_url=redis_url,
                    rabbitmq_url=rabbitmq_url,
                    namespace=namespace,
                    pricing_file=pricing_file,
                )
            except (SystemExit, OSError):
                await exits.aclose()
                if attempt == 2:
                    raise
                continue
            async with exits:
                yield running
            break
    finally:
        await delete_namespace(rabbitmq_url, namespace)


def stack_fixture(name: str, *, fixture: str) -> Any:
    """A package-scoped fixture called `fixture`: the whole stack named `name` (its broker namespace
    suffix and databases), for the tests of one package."""

    @pytest.fixture(name=fixture, scope="package")
    async def stack(
        make_database_url: Callable[[str], str],
        redis_url: str,
        rabbitmq_url: str,
        broker_namespace: str,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> AsyncIterator[Stack]:
        workdir = tmp_path_factory.mktemp(f"{name}-stack")
        async with running_stack(
            name, make_database_url, redis_url, rabbitmq_url, broker_namespace, workdir
        ) as running:
            yield running

    return stack
