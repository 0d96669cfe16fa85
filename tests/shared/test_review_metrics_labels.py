"""Metrics label cardinality: a raw request path must never become a label value, or any client can
mint unbounded time series (and memory) with made-up URLs. (Methods are bounded: the HTTP parser
refuses unknown ones with 400 before the app sees them.)"""

from __future__ import annotations

import uuid

import httpx

from shared.metrics import render_latest
from shared.web import create_service_app
from tests.support.servers import serve_app


def _series_mentioning(marker: str) -> list[str]:
    body, _ = render_latest()
    return [line for line in body.decode().splitlines() if marker in line]


async def test_requests_that_match_no_route_never_put_their_path_or_method_in_a_label() -> None:
    service = f"labels-{uuid.uuid4().hex[:8]}"
    app = create_service_app(service, max_body_bytes=100)

    @app.get("/v1/users/{user_id}/purchases")
    async def purchases(user_id: str) -> dict[str, str]:
        return {"user_id": user_id}

    marker = uuid.uuid4().hex
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as client:
        # Trailing slash: Starlette answers with a redirect before any route is chosen.
        redirected = await client.get(f"/v1/users/{marker}a/purchases/")
        assert redirected.status_code == 307
        # Declared body over the limit: refused before routing.
        too_big = await client.post(f"/v1/{marker}b/anything", content=b"x" * 200)
        assert too_big.status_code == 413
        ok = await client.get(f"/v1/users/{marker}c/purchases")
        assert ok.status_code == 200

    assert _series_mentioning(marker) == []
    # The matched request is still counted, under its route template.
    assert any(
        'route="/v1/users/{user_id}/purchases"' in line and 'status="200"' in line
        for line in _series_mentioning(f'service="{service}"')
    )
    # The unmatched ones are counted too, under one fixed label.
    unmatched = [line for line in _series_mentioning(f'service="{service}"') if 'route="unmatched"' in line]
    assert any('status="307"' in line for line in unmatched)
    assert any('status="413"' in line for line in unmatched)
