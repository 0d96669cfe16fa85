"""PACKS_FILE values that YAML or pydantic's lax mode would quietly turn into something else: a boolean
is not a number of credits or cents (`credits: true` became a 1-credit pack), and a currency must be a
three-letter ASCII code Stripe can accept (`ÄÖÜ` passed `isalpha`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.billing.catalog import CatalogError, load_catalog


@pytest.mark.parametrize(
    ("pack", "message"),
    [
        ("{id: a, name: A, price_cents: 500, currency: usd, credits: true}", "credits"),
        ("{id: a, name: A, price_cents: true, currency: usd, credits: 100}", "price_cents"),
        ("{id: a, name: A, price_cents: 4.99, currency: usd, credits: 100}", "price_cents"),
        ("{id: a, name: A, price_cents: 500, currency: ÄÖÜ, credits: 100}", "currency"),
        ("{id: a, name: A, price_cents: 0, currency: usd, credits: 100}", "price_cents"),
        ("{id: a, name: A, price_cents: 500, currency: usd, credits: -100}", "credits"),
    ],
)
def test_odd_pack_values_are_refused(tmp_path: Path, pack: str, message: str) -> None:
    path = tmp_path / "packs.yaml"
    path.write_text(f"- {pack}\n", encoding="utf-8")
    with pytest.raises(CatalogError) as raised:
        load_catalog(str(path))
    assert message in str(raised.value)


def test_plain_numbers_still_load(tmp_path: Path) -> None:
    path = tmp_path / "packs.yaml"
    path.write_text("- {id: a, name: A, price_cents: 500, currency: USD, credits: 100}\n")
    (pack,) = load_catalog(str(path)).by_price()
    assert (pack.price_cents, pack.credits, pack.currency) == (500, 100, "usd")
