"""SQL of `api_keys`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


async def insert_api_key(
    conn: AsyncConnection, key_id: str, user_id: str, name: str | None, prefix: str, key_hash: str
) -> Any:
    return (
        await conn.execute(
            text(
                "INSERT INTO api_keys (id, user_id, name, prefix, key_hash) VALUES (:i, :u, :n, :p, :h) "
                "RETURNING id, name, prefix, created_at, revoked_at"
            ),
            {"i": key_id, "u": user_id, "n": name, "p": prefix, "h": key_hash},
        )
    ).one()


async def list_api_keys(conn: AsyncConnection, user_id: str) -> list[Any]:
    rows = await conn.execute(
        text(
            "SELECT id, name, prefix, created_at, revoked_at FROM api_keys WHERE user_id = :u "
            "ORDER BY created_at, id"
        ),
        {"u": user_id},
    )
    return list(rows)


async def revoke_api_key(conn: AsyncConnection, user_id: str, key_id: str, when: datetime) -> Any:
    return (
        await conn.execute(
            text(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, :w) WHERE id = :i AND user_id = :u "
                "RETURNING id, name, prefix, created_at, revoked_at"
            ),
            {"w": when, "i": key_id, "u": user_id},
        )
    ).first()


async def find_api_key(conn: AsyncConnection, key_hash: str) -> Any:
    return (
        await conn.execute(
            text(
                "SELECT k.id, k.user_id, k.revoked_at, a.api_access_unlocked FROM api_keys k "
                "JOIN accounts a ON a.user_id = k.user_id WHERE k.key_hash = :h"
            ),
            {"h": key_hash},
        )
    ).first()
