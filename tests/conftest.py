"""Shared fixtures: settings, databases (SQLite file and a private PostgreSQL database).

The helpers behind them live in ``tests/support`` (settings, db); test modules import those from
there, never from a conftest.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from config import Settings
from core.db.engine import create_engine
from tests.support.cli import copy_of, migrated_sqlite
from tests.support.db import (
    copy_sqlite_database,
    create_pg_database,
    drop_pg_database,
    migrated,
    remove_sqlite_database,
    sqlite_dsn,
)
from tests.support.services import postgres_dsn, require
from tests.support.settings import make_settings

# A developer's .env (the README's "Add a module" walkthrough writes one) must not reach the tests,
# nor the processes they start: python-dotenv's switch, which config.load_settings honours too.
# Tests of the .env file itself take it off (monkeypatch.delenv).
os.environ["PYTHON_DOTENV_DISABLED"] = "1"


@pytest.fixture(scope="session")
def settings_factory() -> Callable[..., Settings]:
    return make_settings


# --- databases ----------------------------------------------------------------------------------


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


@pytest.fixture(scope="session")
async def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path: Path = tmp_path_factory.mktemp("sqlite") / "atrium.db"
    return await migrated(sqlite_dsn(path))


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


# --- a database of the test's own: isolation by database ----------------------------------------
# For tests whose data must really be committed (seen from other sessions or connections). Each
# gets a copy of a database migrated once per session, and it is dropped (deleted) afterwards.


@pytest.fixture(scope="session")
async def migrated_pg_template() -> AsyncIterator[str]:
    """The name of a migrated PostgreSQL database that private databases are copied from."""
    require("postgres")
    name = await create_pg_database("atrium_template")
    try:
        await migrated(postgres_dsn(name))
        yield name
    finally:
        await drop_pg_database(name)


@pytest.fixture
async def private_postgres_url(migrated_pg_template: str) -> AsyncIterator[str]:
    """A migrated PostgreSQL database of this test's own, dropped after it."""
    name = await create_pg_database(template=migrated_pg_template)
    try:
        yield postgres_dsn(name)
    finally:
        await drop_pg_database(name)


@pytest.fixture(scope="session")
async def migrated_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that private databases are copied from."""
    path: Path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    await migrated(sqlite_dsn(path))
    return path


@pytest.fixture
def private_sqlite_url(migrated_sqlite_template: Path, tmp_path: Path) -> Iterator[str]:
    """A migrated SQLite file of this test's own, deleted after it."""
    path = copy_sqlite_database(migrated_sqlite_template, tmp_path / "private.db")
    try:
        yield sqlite_dsn(path)
    finally:
        remove_sqlite_database(path)


# --- the CLI's create-admin tests (tests/test_cli.py, tests/test_cli_polish.py) -------------------


@pytest.fixture(scope="module")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``atrium migrate`` per test module on a SQLite file; each test gets a copy of it."""
    return migrated_sqlite(tmp_path_factory.mktemp("template") / "admin.db")


@pytest.fixture
def migrated_db(tmp_path: Path, migrated_template: Path) -> Path:
    return copy_of(migrated_template, tmp_path / "admin.db")
