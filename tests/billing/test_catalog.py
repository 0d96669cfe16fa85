"""Packs: the built-in catalog, PACKS_FILE loading and validation, GET /v1/packs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.billing.api import pack_json
from services.billing.catalog import CatalogError, load_catalog
from tests.support.billing_service import RunningBilling
from tests.support.servers import REPO_ROOT


async def test_packs_endpoint_lists_the_builtin_catalog_by_price(billing: RunningBilling) -> None:
    async with billing.client() as client:
        response = await client.get("/v1/packs")
    assert response.status_code == 200
    packs = response.json()["data"]
    assert [p["id"] for p in packs] == ["starter", "standard", "pro", "business"]
    by_id = {p["id"]: p for p in packs}
    assert by_id["starter"] == {
        "id": "starter",
        "name": "Starter",
        "price_cents": 500,
        "currency": "usd",
        "credits": 100,
        "unlocks_api": False,
        "badge": None,
        "price_per_credit_cents": 5,
    }
    assert by_id["standard"]["badge"] == "Popular" and by_id["standard"]["credits"] == 500
    assert by_id["pro"]["unlocks_api"] is True and by_id["pro"]["badge"] == "Best Value + API"
    assert by_id["pro"]["price_per_credit_cents"] == 2.5
    assert by_id["business"]["unlocks_api"] is True and by_id["business"]["price_cents"] == 10000
    assert by_id["business"]["price_per_credit_cents"] == 2


def test_legacy_catalog_file_loads() -> None:
    catalog = load_catalog(str(REPO_ROOT / "deploy" / "packs.legacy.yaml"))
    packs = {p.id: p for p in catalog.by_price()}
    assert [p.id for p in catalog.by_price()] == ["basic", "premium", "pro", "enterprise"]
    assert (packs["basic"].credits, packs["basic"].price_cents) == (40, 999)
    assert packs["premium"].badge == "Best Value"
    assert [p.id for p in catalog.by_price() if p.unlocks_api] == ["pro", "enterprise"]
    assert pack_json(packs["basic"])["price_per_credit_cents"] == 24.975


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "- id: a\n  name: A\n  price_cents: -1\n  currency: usd\n  credits: 5\n  unlocks_api: false\n",
            "price_cents",
        ),
        ("- id: a\n  name: A\n  price_cents: 100\n  currency: usd\n  unlocks_api: false\n", "credits"),
        ("{id: a}", "expected a YAML list"),
        ("- [unclosed", "not valid YAML"),
        (
            "- {id: a, name: A, price_cents: 1, currency: usd, credits: 1}\n"
            "- {id: a, name: B, price_cents: 2, currency: usd, credits: 2}\n",
            "duplicate pack ids: a",
        ),
        ("- {id: a, name: A, price_cents: 1, currency: usd, credits: 1, colour: red}\n", "colour"),
    ],
)
def test_bad_packs_file_is_refused_with_a_clear_message(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "packs.yaml"
    path.write_text(content)
    with pytest.raises(CatalogError) as raised:
        load_catalog(str(path))
    assert message in str(raised.value) and str(path) in str(raised.value)


def test_service_refuses_to_start_with_a_bad_packs_file(tmp_path: Path) -> None:
    path = tmp_path / "packs.yaml"
    path.write_text("- id: broken\n")
    result = subprocess.run(
        [sys.executable, "-m", "services.billing"],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PACKS_FILE": str(path), "PORT": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "PACKS_FILE" in result.stderr and "pack #1" in result.stderr
