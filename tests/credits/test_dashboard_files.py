"""The operator dashboard's static files: sent gzipped when the browser accepts it, with a
Cache-Control header, byte for byte the files on disk once decompressed; other routes untouched."""

from __future__ import annotations

import gzip
from dataclasses import dataclass

import httpx
import pytest

from services.credits.app import DASHBOARD_DIR
from shared.vendor import CHARTJS_DIR
from tests.support.credits_service import CreditsService

CHART_JS = (CHARTJS_DIR / "chart.umd.js").read_bytes()
INDEX_HTML = (DASHBOARD_DIR / "index.html").read_bytes()
FILES = [
    ("/admin/vendor/chart.umd.js", CHART_JS, "public, max-age=86400"),
    ("/admin/assets/dashboard.js", (DASHBOARD_DIR / "dashboard.js").read_bytes(), "no-cache"),
    ("/admin/assets/dashboard.css", (DASHBOARD_DIR / "dashboard.css").read_bytes(), "no-cache"),
]


@dataclass(frozen=True)
class Sent:
    status_code: int
    headers: httpx.Headers
    content: bytes  # as sent (httpx would decompress it)


async def raw_get(credits: CreditsService, path: str, headers: dict[str, str]) -> Sent:
    async with (
        httpx.AsyncClient(base_url=credits.url, timeout=30) as http,
        http.stream("GET", path, headers=headers) as r,
    ):
        return Sent(r.status_code, r.headers, b"".join([chunk async for chunk in r.aiter_raw()]))


@pytest.mark.parametrize(("path", "on_disk", "cache_control"), FILES)
async def test_static_files_are_gzipped_and_cacheable(
    credits: CreditsService, path: str, on_disk: bytes, cache_control: str
) -> None:
    r = await raw_get(credits, path, {"Accept-Encoding": "gzip, deflate"})
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers["cache-control"] == cache_control
    assert r.headers["vary"] == "Accept-Encoding"
    assert int(r.headers["content-length"]) == len(r.content) < len(on_disk)
    assert gzip.decompress(r.content) == on_disk

    # Without gzip in Accept-Encoding: the file as it is.
    plain = await raw_get(credits, path, {"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.headers["cache-control"] == cache_control
    assert plain.content == on_disk

    # A revalidation by ETag costs no body.
    again = await raw_get(credits, path, {"Accept-Encoding": "gzip", "If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


async def test_chart_js_compresses_to_a_third(credits: CreditsService) -> None:
    r = await raw_get(credits, "/admin/vendor/chart.umd.js", {"Accept-Encoding": "gzip"})
    assert len(r.content) < len(CHART_JS) / 2


async def test_other_routes_are_not_compressed(credits: CreditsService) -> None:
    r = await raw_get(credits, "/v1/admin/analytics", {"Accept-Encoding": "gzip", **credits.admin_headers})
    assert r.status_code == 200 and "content-encoding" not in r.headers and r.content.startswith(b"{")
    page = await raw_get(credits, "/admin/", {"Accept-Encoding": "gzip"})
    assert page.status_code == 200 and page.headers["cache-control"] == "no-cache"
    assert page.content == INDEX_HTML
