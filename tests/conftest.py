"""Shared fixtures: settings, databases (SQLite file and a private PostgreSQL database)."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings
from core.db.engine import create_engine
from migrations import upgrade
from tests.support.services import POSTGRES_HOST, POSTGRES_PORT, POSTGRES_USER, postgres_dsn, require

TEST_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def make_settings(**overrides: Any) -> Settings:
    """Test-profile settings with cheap password hashing; ``overrides`` win."""
    values: dict[str, Any] = {"env": "test", "log_level": "WARNING", "secret_key": TEST_SECRET}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def settings_factory() -> Callable[..., Settings]:
    return make_settings


# --- databases ----------------------------------------------------------------------------------


async def _admin_connection() -> asyncpg.Connection:
    return await asyncpg.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user=POSTGRES_USER,
                                 database="postgres")


async def create_pg_database(prefix: str = "atrium_test") -> str:
    """Create a private database (never share ``test``); returns its name."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    conn = await _admin_connection()
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    conn = await _admin_connection()
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def pg_database_factory() -> AsyncIterator[Callable[[], Any]]:
    """Makes fresh PostgreSQL databases for the session and drops them all at the end."""
    created: list[str] = []

    async def make() -> str:
        require("postgres")
        name = await create_pg_database()
        created.append(name)
        return postgres_dsn(name)

    yield make
    for name in created:
        await drop_pg_database(name)


async def migrated(url: str) -> str:
    await asyncio.to_thread(upgrade, make_settings(database_url=url))
    return url


@pytest.fixture(scope="session")
async def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "atrium.db"
    return await migrated(f"sqlite+aiosqlite:///{path}")


@pytest.fixture(scope="session")
async def postgres_url(pg_database_factory: Callable[[], Any]) -> str:
    return await migrated(await pg_database_factory())


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The same tests on SQLite and on PostgreSQL (a migrated private database each)."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
async def session(database_url: str) -> AsyncIterator[AsyncSession]:
    """A session inside a transaction that is rolled back after the test: isolation by transaction.

    Code under test may commit or use savepoints; all of it lives in the outer transaction.
    """
    engine = create_engine(database_url)
    async with engine.connect() as connection:
        transaction = await connection.begin()
        session = AsyncSession(bind=connection, join_transaction_mode="create_savepoint",
                               expire_on_commit=False)
        try:
            yield session
        finally:
            await session.close()
            await transaction.rollback()
    await engine.dispose()
