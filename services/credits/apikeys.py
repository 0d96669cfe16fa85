"""API keys: shown once at creation, stored as a SHA-256 hash and a short display prefix."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from services.credits.stores import accounts as account_store
from services.credits.stores import api_keys as api_key_store
from shared.auth import API_KEY_PREFIX, new_api_key
from shared.errors import ApiAccessLocked, InvalidApiKey, NotFound

KEY_PREFIX = API_KEY_PREFIX
PREFIX_SHOWN = 10  # "cp_" + 7 characters identify a key in lists without revealing it


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """A key as lists show it: never the key itself."""

    id: str
    name: str | None
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class KeyOwner:
    """Whose a verified key is."""

    user_id: str
    key_id: str
    api_access_unlocked: bool


def _key(row: Any) -> ApiKey:
    return ApiKey(row.id, row.name, row.prefix, row.created_at, row.revoked_at)


class ApiKeys:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, user_id: str, name: str | None) -> tuple[ApiKey, str]:
        """The new key's listing and the key itself (shown this once)."""
        key = new_api_key()
        key_id = "key_" + secrets.token_hex(8)
        async with self.engine.begin() as conn:
            account = await account_store.get_account(conn, user_id)
            if account is None:
                raise NotFound(f"Unknown user {user_id!r}.")
            if not account.api_access_unlocked:
                raise ApiAccessLocked("API access is locked. Buy the Pro or Business pack to unlock the API.")
            row = await api_key_store.insert_api_key(
                conn, key_id, user_id, name, key[:PREFIX_SHOWN], hash_key(key)
            )
        return _key(row), key

    async def list(self, user_id: str) -> list[ApiKey]:
        async with self.engine.connect() as conn:
            if await account_store.get_account(conn, user_id) is None:
                raise NotFound(f"Unknown user {user_id!r}.")
            rows = await api_key_store.list_api_keys(conn, user_id)
        return [_key(r) for r in rows]

    async def revoke(self, user_id: str, key_id: str) -> ApiKey:
        async with self.engine.begin() as conn:
            row = await api_key_store.revoke_api_key(conn, user_id, key_id, datetime.now(UTC))
        if row is None:
            raise NotFound("Unknown API key.")
        return _key(row)

    async def verify(self, key: str) -> KeyOwner:
        if not key.startswith(KEY_PREFIX) or len(key) > 200:
            raise InvalidApiKey()
        async with self.engine.connect() as conn:
            row = await api_key_store.find_api_key(conn, hash_key(key))
        if row is None or row.revoked_at is not None:
            raise InvalidApiKey()
        return KeyOwner(row.user_id, row.id, bool(row.api_access_unlocked))
