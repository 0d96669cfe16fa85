"""The pack catalog (docs/api.md, Billing): built in, or loaded and validated from `PACKS_FILE` at start."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class CatalogError(Exception):
    """The packs file cannot be used; the message says why (the service refuses to start)."""


class Pack(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str = Field(min_length=1, max_length=200)
    # Strict: lax mode would read `credits: true` as a 1-credit pack.
    price_cents: int = Field(gt=0, le=100_000_000, strict=True)
    currency: str = Field(min_length=3, max_length=3)
    credits: int = Field(gt=0, le=10**12, strict=True)
    unlocks_api: bool = False
    badge: str | None = Field(default=None, max_length=100)

    @field_validator("currency")
    @classmethod
    def _lower_currency(cls, value: str) -> str:
        # Stripe's currency codes are lowercase ISO 4217.
        if not (value.isascii() and value.isalpha()):
            raise ValueError("currency must be a three-letter ISO code")
        return value.lower()

    @property
    def price_per_credit_cents(self) -> Decimal:
        return (Decimal(self.price_cents) / Decimal(self.credits)).quantize(
            Decimal("0.0001"), rounding=ROUND_HALF_UP
        )


BUILTIN_PACKS: tuple[Pack, ...] = (
    Pack(id="starter", name="Starter", price_cents=500, currency="usd", credits=100),
    Pack(id="standard", name="Standard", price_cents=1500, currency="usd", credits=500, badge="Popular"),
    Pack(
        id="pro",
        name="Pro",
        price_cents=3000,
        currency="usd",
        credits=1200,
        unlocks_api=True,
        badge="Best Value + API",
    ),
    Pack(id="business", name="Business", price_cents=10000, currency="usd", credits=5000, unlocks_api=True),
)


class Catalog:
    def __init__(self, packs: tuple[Pack, ...] | list[Pack]) -> None:
        if not packs:
            raise CatalogError("the catalog has no packs")
        ids = [p.id for p in packs]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise CatalogError(f"duplicate pack ids: {', '.join(duplicates)}")
        self._packs = {p.id: p for p in packs}
        self._sorted = sorted(packs, key=lambda p: (p.price_cents, p.id))

    def get(self, pack_id: str) -> Pack | None:
        return self._packs.get(pack_id)

    def by_price(self) -> list[Pack]:
        return list(self._sorted)


def load_catalog(packs_file: str | None) -> Catalog:
    if not packs_file:
        return Catalog(BUILTIN_PACKS)
    path = Path(packs_file)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CatalogError(f"PACKS_FILE {path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise CatalogError(f"PACKS_FILE {path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, list):
        raise CatalogError(f"PACKS_FILE {path}: expected a YAML list of packs, got {type(raw).__name__}")
    packs: list[Pack] = []
    for index, item in enumerate(raw):
        try:
            packs.append(Pack.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'pack'}: {err['msg']}" for err in exc.errors()
            )
            raise CatalogError(f"PACKS_FILE {path}: pack #{index + 1}: {problems}") from None
    try:
        return Catalog(packs)
    except CatalogError as exc:
        raise CatalogError(f"PACKS_FILE {path}: {exc}") from None
