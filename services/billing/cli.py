"""Command line: serve (default) or `reconcile --since YYYY-MM-DD`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from pydantic import ValidationError

from services.billing.app import create_app
from services.billing.catalog import CatalogError
from services.billing.config import BillingSettings
from services.billing.reconcile import ReconcileError, reconcile
from shared.logs import configure_logging
from shared.service import serve


def _app_or_exit(settings: BillingSettings) -> object:
    try:
        return create_app(settings)
    except CatalogError as exc:
        print(f"billing: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _since(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date: {value!r} (e.g. 2026-11-01)") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "reconcile":
        if argv:
            print(f"usage: python -m services.billing [reconcile --since DATE]; got {argv}", file=sys.stderr)
            return 2
        serve(BillingSettings, _app_or_exit)
        return 0
    parser = argparse.ArgumentParser(prog="python -m services.billing reconcile")
    parser.add_argument("--since", required=True, type=_since, help="ISO date or datetime (UTC if no zone)")
    args = parser.parse_args(argv[1:])
    try:
        settings = BillingSettings()
    except ValidationError as exc:
        print(f"billing: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging("billing", settings.log_level, json_format=False)
    try:
        asyncio.run(reconcile(settings, args.since))
    except (ReconcileError, CatalogError) as exc:
        print(f"billing reconcile: {exc}", file=sys.stderr)
        return 2
    return 0
