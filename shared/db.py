"""PostgreSQL plumbing: create the database if missing, the async engine, Alembic on start."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from shared.settings import DatabaseSettings

log = logging.getLogger("shared.db")


def _asyncpg_dsn(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def ensure_database(url: str) -> None:
    """docs/configuration.md: the service's database is created if it does not exist."""
    name = make_url(url).database
    if not name:
        return
    conn = await asyncpg.connect(_asyncpg_dsn(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await conn.execute(f'CREATE DATABASE "{name}"')
                log.info("created database %s", name)
            except asyncpg.DuplicateDatabaseError:
                pass  # another process won the race
    finally:
        await conn.close()


async def drop_database(url: str) -> None:
    name = make_url(url).database
    conn = await asyncpg.connect(_asyncpg_dsn(url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def create_engine(
    url: str, pool_size: int = 5, max_overflow: int = 2, *, pgbouncer: bool = False
) -> AsyncEngine:
    """The SQLAlchemy engine: at most `pool_size + max_overflow` connections, callers past them wait."""
    connect_args: dict[str, Any] = {}
    if pgbouncer:
        # Behind PgBouncer in transaction mode (SQLAlchemy's asyncpg dialect notes): no statement
        # cache, and unique names so two clients' prepared statements never meet on one server connection.
        connect_args = {
            "prepared_statement_cache_size": 0,
            "statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        }
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True, connect_args=connect_args
    )


def engine_for(settings: DatabaseSettings) -> AsyncEngine:
    return create_engine(
        settings.database_url,
        settings.db_pool_size,
        settings.db_max_overflow,
        pgbouncer=settings.db_pgbouncer,
    )


async def create_hot_pool(settings: DatabaseSettings, size: int) -> asyncpg.Pool:
    """A raw asyncpg pool of at most `size` connections (credits' hot path)."""
    return await asyncpg.create_pool(
        _asyncpg_dsn(settings.database_url),
        min_size=min(2, size),
        max_size=size,
        statement_cache_size=0 if settings.db_pgbouncer else 100,
    )


def alembic_config(url: str, migrations_dir: Path) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


async def migrate(url: str, migrations_dir: Path) -> None:
    """Bring the schema to head. Alembic's env runs its own event loop, so it gets a thread."""
    await ensure_database(url)
    cfg = alembic_config(url, migrations_dir)
    # Serialise concurrent starters of the same service with an advisory lock held around the upgrade.
    conn = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        await conn.execute("SELECT pg_advisory_lock(72707)")
        await asyncio.to_thread(command.upgrade, cfg, "head")
    finally:
        await conn.execute("SELECT pg_advisory_unlock(72707)")
        await conn.close()
