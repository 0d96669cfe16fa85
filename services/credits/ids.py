"""Checks of the identifiers callers send: user ids and reservation ids (UUIDs)."""

from __future__ import annotations

import uuid


def valid_user_id(value: str) -> bool:
    """1-200 characters, no control characters (they would break logs, keys and headers)."""
    return 0 < len(value) <= 200 and value.isprintable()


def uuid_or_none(value: str) -> str | None:
    """The UUID's canonical text, or None when `value` is not one (parsed once: batches call this
    for every item)."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
