"""SQL of `reservations` (holds): reads and changes over SQLAlchemy, and the hot path's server-side
functions over raw asyncpg."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from services.credits.stores.accounts import lock_accounts_key_share


@dataclass(frozen=True)
class Reservation:
    id: str
    user_id: str
    amount: int
    idempotency_key: str | None
    kind: str
    status: str
    charged: int | None
    expires_at: datetime
    created_at: datetime


@dataclass(frozen=True)
class NewHold:
    id: str
    user_id: str
    amount: int
    idempotency_key: str | None
    kind: str
    expires_at: datetime


def _reservation(row: Any) -> Reservation:
    return Reservation(
        id=str(row.id),
        user_id=row.user_id,
        amount=row.amount,
        idempotency_key=row.idempotency_key,
        kind=row.kind,
        status=row.status,
        charged=row.charged,
        expires_at=row.expires_at,
        created_at=row.created_at,
    )


RES_COLUMNS = "id, user_id, amount, idempotency_key, kind, status, charged, expires_at, created_at"


async def open_holds_total(conn: AsyncConnection, user_id: str) -> int:
    return int(
        (
            await conn.execute(
                text(
                    "SELECT COALESCE(SUM(amount), 0) FROM reservations WHERE user_id = :u AND status = 'held'"
                ),
                {"u": user_id},
            )
        ).scalar_one()
    )


async def open_holds(conn: AsyncConnection, user_id: str) -> list[tuple[str, int, str | None, int]]:
    """(reservation_id, amount, idempotency_key, deadline in ms since the epoch) of the open holds."""
    rows = await conn.execute(
        text(
            "SELECT id, amount, idempotency_key, expires_at FROM reservations WHERE user_id = :u AND status = 'held'"
        ),
        {"u": user_id},
    )
    return [(str(r.id), int(r.amount), r.idempotency_key, int(r.expires_at.timestamp() * 1000)) for r in rows]


async def get_reservation(
    conn: AsyncConnection, reservation_id: str, *, for_update: bool = False
) -> Reservation | None:
    row = (
        await conn.execute(
            text(
                f"SELECT {RES_COLUMNS} FROM reservations WHERE id = :id"
                + (" FOR UPDATE" if for_update else "")
            ),
            {"id": reservation_id},
        )
    ).first()
    return _reservation(row) if row else None


async def get_reservation_by_key(conn: AsyncConnection, user_id: str, key: str) -> Reservation | None:
    row = (
        await conn.execute(
            text(f"SELECT {RES_COLUMNS} FROM reservations WHERE user_id = :u AND idempotency_key = :k"),
            {"u": user_id, "k": key},
        )
    ).first()
    return _reservation(row) if row else None


async def end_reservation(
    conn: AsyncConnection, reservation_id: str, status: str, when: datetime, charged: int | None = None
) -> None:
    await conn.execute(
        text("UPDATE reservations SET status = :s, charged = :c, ended_at = :w WHERE id = :id"),
        {"s": status, "c": charged, "w": when, "id": reservation_id},
    )


async def extend_open_holds(conn: AsyncConnection, ids: Sequence[str], until: datetime) -> None:
    """Moves the deadline of open holds to at least `until` (their settlement has arrived late)."""
    if ids:
        await conn.execute(
            text(
                "UPDATE reservations SET expires_at = :t "
                "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'held' AND expires_at < :t"
            ),
            {"ids": list(ids), "t": until},
        )


async def expire_holds(conn: AsyncConnection, ids: Sequence[str], now: datetime) -> list[str]:
    """Ends the given holds as expired if still open; returns those it ended."""
    if not ids:
        return []
    rows = await conn.execute(
        text(
            "UPDATE reservations SET status = 'expired', ended_at = :now "
            "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'held' RETURNING id"
        ),
        {"ids": list(ids), "now": now},
    )
    return [str(r.id) for r in rows]


async def expire_due(conn: AsyncConnection, now: datetime, limit: int) -> list[Reservation]:
    rows = await conn.execute(
        text(
            f"""
            UPDATE reservations SET status = 'expired', ended_at = :now
            WHERE id IN (
                SELECT id FROM reservations WHERE status = 'held' AND expires_at <= :now
                ORDER BY expires_at LIMIT :l FOR UPDATE SKIP LOCKED)
            RETURNING {RES_COLUMNS}
            """
        ),
        {"now": now, "l": limit},
    )
    return [_reservation(r) for r in rows]


async def extend_holds(
    conn: AsyncConnection, ids: Sequence[str], deadlines: Sequence[datetime], now: datetime
) -> list[Any]:
    """Moves the deadlines of open holds later (never earlier); a hold that ended or is past its
    deadline stays as it is. Returns (id, user_id, expires_at) of the holds extended. The accounts
    are locked KEY SHARE first, as for every hold change Redis mirrors (a rebuild waits for it)."""
    users = await conn.execute(
        text("SELECT DISTINCT user_id FROM reservations WHERE id = ANY(CAST(:ids AS uuid[]))"),
        {"ids": list(ids)},
    )
    await lock_accounts_key_share(conn, [r.user_id for r in users])
    rows = await conn.execute(
        text(
            """
            UPDATE reservations r SET expires_at = GREATEST(r.expires_at, w.deadline)
            FROM unnest(CAST(:ids AS uuid[]), CAST(:deadlines AS timestamptz[])) AS w(id, deadline)
            WHERE r.id = w.id AND r.status = 'held' AND r.expires_at > :now
            RETURNING r.id, r.user_id, r.expires_at
            """
        ),
        {"ids": list(ids), "deadlines": list(deadlines), "now": now},
    )
    return list(rows)


async def reservation_statuses(conn: AsyncConnection, ids: Sequence[str]) -> dict[str, str]:
    rows = await conn.execute(
        text("SELECT id, status FROM reservations WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": list(ids)}
    )
    return {str(r.id): r.status for r in rows}


# ---------------------------------------------------------------- hot path (raw asyncpg, one round trip each)
# The functions live in migration 0002; they run the same statements as above as one server-side call.


async def insert_holds_fast(conn: asyncpg.Connection, holds: Sequence[NewHold]) -> dict[str, int]:
    """Inserts a batch of holds; returns {inserted id: the account's Redis epoch}. A hold whose
    idempotency key already has a reservation is not inserted."""
    rows = await conn.fetch(
        "SELECT * FROM credits_insert_holds($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[],"
        " $6::timestamptz[])",
        [h.id for h in holds],
        [h.user_id for h in holds],
        [h.amount for h in holds],
        [h.idempotency_key for h in holds],
        [h.kind for h in holds],
        [h.expires_at for h in holds],
    )
    return {str(r["hold_id"]): int(r["epoch"]) for r in rows}


class Outcome(StrEnum):
    """What credits_commit / credits_commit_batch / credits_release (migrations 0002, 0003, 0005)
    decided for one reservation."""

    COMMITTED = "committed"  # a commit: committed now; a release: committed before
    REPLAY = "replay"  # a commit of a reservation committed before
    RELEASED = "released"  # ended by an earlier release
    RELEASED_NOW = "released_now"
    EXPIRED = "expired"  # ended by an earlier expiry
    EXPIRED_NOW = "expired_now"  # past its deadline: expired by this call
    TOO_MUCH = "too_much"  # a commit of more than the hold
    NOT_FOUND = "not_found"


# Looked up once per row from a dict: `Outcome(text)` runs the enum's constructor (about 1 µs on 3.11).
_OUTCOMES = {outcome.value: outcome for outcome in Outcome}


class Settled(asyncpg.Record):  # type: ignore[misc]  # asyncpg ships no type hints
    """A row of those functions, read by name; asyncpg builds it in place of its own record (no copy),
    and its outcome is parsed into an Outcome when read. A release's row has no charged, balance,
    version or crossed."""

    @property
    def outcome(self) -> Outcome:
        return _OUTCOMES[self["outcome"]]

    @property
    def user_id(self) -> str:
        user_id: str = self["user_id"]
        return user_id

    @property
    def amount(self) -> int:
        return int(self["amount"])

    @property
    def charged(self) -> int:
        """What a commit charged (0 when nothing was)."""
        return int(self["charged"] or 0)

    @property
    def balance(self) -> int:
        return int(self["balance"])

    @property
    def version(self) -> int:
        return int(self["version"])

    @property
    def crossed(self) -> bool:
        return bool(self["crossed"])


async def commit_fast(
    pool: asyncpg.Pool,
    reservation_id: str,
    amount: int | None,
    now: datetime,
    threshold: int,
    low_event: str,
    details: str | None = None,
) -> Settled:
    """Returns (outcome, user_id, amount, charged, balance, version, crossed); see migrations 0002 and
    0005 (`details`, JSON text, is kept on the usage entry)."""
    settled: Settled = await pool.fetchrow(
        "SELECT * FROM credits_commit($1::uuid, $2, $3, $4, $5::jsonb, $6::jsonb)",
        reservation_id,
        amount,
        now,
        threshold,
        low_event,
        details,
        record_class=Settled,
    )
    return settled


async def commit_batch_fast(
    conn: asyncpg.Connection,
    ids: Sequence[str],
    amounts: Sequence[int | None],
    now: datetime,
    threshold: int,
    low_events: Sequence[str],
    details: Sequence[str | None] | None = None,
) -> list[Settled]:
    """One row per id (in lock order, not input order): (reservation_id, outcome, user_id, amount,
    charged, balance, version, crossed); see migrations 0002, 0003 and 0005 (`details`: JSON text per
    id, or None, kept on its usage entry)."""
    return list(
        await conn.fetch(
            "SELECT * FROM credits_commit_batch($1::uuid[], $2::bigint[], $3, $4, $5::jsonb[], $6::jsonb[])",
            list(ids),
            list(amounts),
            now,
            threshold,
            list(low_events),
            list(details) if details is not None else None,
            record_class=Settled,
        )
    )


async def release_fast(pool: asyncpg.Pool, reservation_id: str, now: datetime) -> Settled:
    """Returns (outcome, user_id, amount); see migration 0002."""
    settled: Settled = await pool.fetchrow(
        "SELECT * FROM credits_release($1::uuid, $2)", reservation_id, now, record_class=Settled
    )
    return settled
