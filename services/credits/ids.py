"""Checks of the identifiers callers send: user ids and reservation ids (UUIDs)."""

from __future__ import annotations

import uuid

from shared.errors import NotFound


def valid_user_id(value: str) -> bool:
    """1-200 characters, no control characters (they would break logs, keys and headers)."""
    return 0 < len(value) <= 200 and value.isprintable()


def canonical_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound("Unknown reservation.") from None


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
