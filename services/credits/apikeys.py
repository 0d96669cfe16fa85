"""API keys: shown once at creation, stored as a SHA-256 hash and a short display prefix."""

from __future__ import annotations

import hashlib
import secrets
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


def _view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
    }


class ApiKeys:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, user_id: str, name: str | None) -> dict[str, Any]:
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
        return {**_view(row), "key": key}

    async def list(self, user_id: str) -> dict[str, Any]:
        async with self.engine.connect() as conn:
            if await account_store.get_account(conn, user_id) is None:
                raise NotFound(f"Unknown user {user_id!r}.")
            rows = await api_key_store.list_api_keys(conn, user_id)
        return {"data": [_view(r) for r in rows]}

    async def revoke(self, user_id: str, key_id: str) -> dict[str, Any]:
        async with self.engine.begin() as conn:
            row = await api_key_store.revoke_api_key(conn, user_id, key_id, datetime.now(UTC))
        if row is None:
            raise NotFound("Unknown API key.")
        return _view(row)

    async def verify(self, key: str) -> dict[str, Any]:
        if not key.startswith(KEY_PREFIX) or len(key) > 200:
            raise InvalidApiKey()
        async with self.engine.connect() as conn:
            row = await api_key_store.find_api_key(conn, hash_key(key))
        if row is None or row.revoked_at is not None:
            raise InvalidApiKey()
        return {
            "user_id": row.user_id,
            "key_id": row.id,
            "api_access_unlocked": bool(row.api_access_unlocked),
        }
