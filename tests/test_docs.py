"""The project's own docs (docs/) keep up with the code: every setting a service reads is in
docs/configuration.md, and every HTTP route it serves is in docs/api.md."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.routing import Mount, Route

from services.billing.app import create_app as billing_app
from services.billing.config import BillingSettings
from services.credits.app import create_app as credits_app
from services.credits.config import CreditsSettings
from services.proxy.app import create_app as proxy_app
from services.proxy.config import ProxySettings

DOCS = Path(__file__).resolve().parents[1] / "docs"
SETTINGS = {"proxy": ProxySettings, "billing": BillingSettings, "credits": CreditsSettings}


def apps() -> dict[str, FastAPI]:
    return {
        "proxy": proxy_app(ProxySettings()),
        "billing": billing_app(BillingSettings()),
        "credits": credits_app(CreditsSettings()),
    }


@pytest.mark.parametrize("service", sorted(SETTINGS))
def test_every_setting_is_documented(service: str) -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = [name.upper() for name in SETTINGS[service].model_fields if f"`{name.upper()}`" not in text]
    assert not missing, f"{service} reads {missing}, which docs/configuration.md does not describe"


def routes(app_routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) of every route, inside included routers too (FastAPI keeps those nested)."""
    for route in app_routes:
        context = getattr(route, "include_context", None)
        if context is not None:
            yield from routes(context.included_router.routes, prefix + context.prefix)
        elif isinstance(route, Route) and not isinstance(route, Mount):
            for method in sorted((route.methods or set()) - {"HEAD"}):
                yield method, prefix + route.path


def _shape(path: str) -> str:
    """`/v1/users/{user_id}` and `/v1/users/{id}` are the same route."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_route_is_documented() -> None:
    text = (DOCS / "api.md").read_text()
    # A documented route appears as `METHOD /path` (several methods may share a path: `GET|POST /x`).
    documented = {
        (method, _shape(path))
        for methods, path in re.findall(r"`((?:[A-Z]+\|)*[A-Z]+) (/[^`?\s]*)", text)
        for method in methods.split("|")
    }
    generic = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    missing = []
    for service, app in apps().items():
        for method, path in routes(app.routes):
            if path not in generic and (method, _shape(path)) not in documented:
                missing.append(f"{service}: {method} {path}")
    assert not missing, "routes missing from docs/api.md:\n" + "\n".join(missing)
