"""Run the proxy in-process for tests: `async with running_proxy(credits_url=..., upstream_base_url=...) as proxy:`.

Yields a `RunningProxy` with `url` (the gateway), `base_url` (`<url>/v1`, what the openai SDK takes),
the settings and the app. Extra settings go in `**overrides` (field names of ProxySettings, e.g.
`upstream_timeout_seconds=1`, `pricing_file=...`, `worker_enabled=False`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

from services.proxy.app import create_app
from services.proxy.config import ProxySettings
from tests.support.servers import bound_socket, serve_app


@dataclass
class RunningProxy:
    url: str
    settings: ProxySettings
    app: FastAPI

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


@contextlib.asynccontextmanager
async def running_proxy(
    *,
    credits_url: str,
    upstream_base_url: str,
    billing_url: str = "http://127.0.0.1:9",
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/",
    redis_url: str = "redis://127.0.0.1:6379/0",
    broker_namespace: str = "",
    **overrides: Any,
) -> AsyncIterator[RunningProxy]:
    # Bound first, so PUBLIC_BASE_URL (the base of URLs the gateway hands out) can be its own address.
    sock = bound_socket()
    overrides.setdefault("public_base_url", f"http://127.0.0.1:{sock.getsockname()[1]}")
    settings = ProxySettings(
        credits_url=credits_url,
        billing_url=billing_url,
        openai_base_url=upstream_base_url,
        openai_api_key=overrides.pop("openai_api_key", "sk-test-upstream"),
        rabbitmq_url=rabbitmq_url,
        redis_url=redis_url,
        broker_namespace=broker_namespace,
        **overrides,
    )
    app = create_app(settings)
    async with serve_app(app, sock=sock) as url:
        yield RunningProxy(url=url, settings=settings, app=app)
