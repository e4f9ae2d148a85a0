"""Database helpers shared by tests: private PostgreSQL databases, migrations, SQLite copies."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from migrations import upgrade
from tests.support.services import POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER
from tests.support.settings import make_settings


async def table_names(url: str) -> set[str]:
    """The tables that exist in the database at ``url``."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def _admin_connection() -> asyncpg.Connection:
    return await asyncpg.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user=POSTGRES_USER,
                                 database="postgres")


async def create_pg_database(prefix: str = "atrium_test", template: str | None = None) -> str:
    """Create a private database (never share ``test``); returns its name.

    With ``template`` it is a copy of that database (which nobody may be connected to): a copy of
    a migrated database is much faster than migrating a new one.
    """
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    conn = await _admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"{copy}')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    conn = await _admin_connection()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def migrated(url: str) -> str:
    """Migrate the database at ``url`` to every head (test settings); returns ``url``."""
    await asyncio.to_thread(upgrade, make_settings(database_url=url))
    return url


def sqlite_dsn(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def copy_sqlite_database(source: Path, target: Path) -> Path:
    """Copy a SQLite database file consistently (its WAL included) through SQLite's backup API."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return target


def remove_sqlite_database(path: Path) -> None:
    """Delete a SQLite database file and its WAL and shared-memory files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
