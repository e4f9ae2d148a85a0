"""The ``atrium`` command line, run as real subprocesses against SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.security import PasswordHasher
from migrations import downgrade
from tests.support.db import table_names
from tests.support.settings import TEST_SECRET, make_settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCHEMA = {"users", "outbox_messages", "inbox_messages", "alembic_version"}
ADMIN_PASSWORD = "correct horse battery staple"


def run_cli(*args: str, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m main <args>`` from the repo root with the test profile and cheap hashing."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    environment.update({
        "ATRIUM_ENV": "test",
        "ATRIUM_DATABASE_URL": database_url,
        "ATRIUM_SECRET_KEY": TEST_SECRET,
        "ATRIUM_PASSWORD_TIME_COST": "1",
        "ATRIUM_PASSWORD_MEMORY_COST": "1024",
        **env,
    })
    return subprocess.run([sys.executable, "-m", "main", *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def sqlite_file_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def query(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as connection:
        return list(connection.execute(sql, params))


# --- migrate --------------------------------------------------------------------------------------


def head_revisions() -> set[str]:
    """The head of core's history and of every enabled module's own history."""
    from alembic.script import ScriptDirectory

    from migrations import alembic_config

    return set(ScriptDirectory.from_config(alembic_config(make_settings())).get_heads())


async def test_migrate_creates_the_schema_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "atrium.db"  # parent folders are created too
    url = sqlite_file_url(path)

    result = ok(run_cli("migrate", database_url=url))

    assert "database at head" in result.stdout
    assert path.exists()
    assert await table_names(url) >= SCHEMA
    assert {row[0] for row in query(path, "SELECT version_num FROM alembic_version")} == head_revisions()


async def test_migrate_twice_on_sqlite_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "atrium.db"
    url = sqlite_file_url(path)
    ok(run_cli("migrate", database_url=url))

    ok(run_cli("migrate", database_url=url))

    assert await table_names(url) >= SCHEMA
    assert len(query(path, "SELECT version_num FROM alembic_version")) == len(head_revisions())


@pytest.mark.postgres
async def test_migrate_creates_the_schema_on_a_fresh_postgres_database(
    pg_database_factory: Callable[[], Any],
) -> None:
    url = await pg_database_factory()
    assert await table_names(url) == set()

    ok(await asyncio.to_thread(run_cli, "migrate", database_url=url))
    assert await table_names(url) >= SCHEMA

    ok(await asyncio.to_thread(run_cli, "migrate", database_url=url))  # twice is fine
    assert await table_names(url) >= SCHEMA


async def test_downgrade_to_base_drops_the_tables_on_sqlite(tmp_path: Path) -> None:
    url = sqlite_file_url(tmp_path / "atrium.db")
    ok(run_cli("migrate", database_url=url))

    await asyncio.to_thread(downgrade, make_settings(database_url=url), "base")

    remaining = await table_names(url)
    assert remaining.isdisjoint({"users", "outbox_messages", "inbox_messages"})
    assert query(tmp_path / "atrium.db", "SELECT version_num FROM alembic_version") == []


@pytest.mark.postgres
async def test_downgrade_to_base_drops_the_tables_on_postgres(
    pg_database_factory: Callable[[], Any],
) -> None:
    url = await pg_database_factory()
    ok(await asyncio.to_thread(run_cli, "migrate", database_url=url))

    await asyncio.to_thread(downgrade, make_settings(database_url=url), "base")

    assert (await table_names(url)) <= {"alembic_version"}

    ok(await asyncio.to_thread(run_cli, "migrate", database_url=url))  # and back up again
    assert await table_names(url) >= SCHEMA


# --- modules ------------------------------------------------------------------------------------


def test_modules_lists_routes_actors_and_tables(tmp_path: Path) -> None:
    result = ok(run_cli("modules", database_url=sqlite_file_url(tmp_path / "unused.db")))
    lines = [line.split() for line in result.stdout.splitlines()]

    assert lines[0][0] == "users"
    assert ["route", "POST", "/api/v1/users"] in lines
    assert ["route", "POST", "/api/v1/auth/token"] in lines
    assert ["route", "GET", "/api/v1/users/me"] in lines
    assert ["route", "GET", "/api/v1/users/{user_id}"] in lines
    assert "users.send_welcome_email" in result.stdout
    assert ["table", "users"] in lines
    assert not (tmp_path / "unused.db").exists()  # listing touches no database


def test_modules_reports_an_unknown_module_on_one_line(tmp_path: Path) -> None:
    result = run_cli("modules", database_url=sqlite_file_url(tmp_path / "x.db"),
                     ATRIUM_MODULES="users,nosuchmodule")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "atrium: module 'nosuchmodule' not found: expected modules/nosuchmodule/module.py"
    ]


def test_a_bad_production_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run_cli("modules", database_url=sqlite_file_url(tmp_path / "x.db"), ATRIUM_ENV="production")

    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("atrium: ATRIUM_")


def test_modules_verify_passes_on_the_project(tmp_path: Path) -> None:
    result = ok(run_cli("modules", "verify", database_url=sqlite_file_url(tmp_path / "unused.db")))

    assert result.stdout.startswith("modules verify: ok (billing, items, users; rules: load, cycle, import")
    assert not (tmp_path / "unused.db").exists()


def test_modules_docs_check_passes_on_the_committed_file(tmp_path: Path) -> None:
    result = ok(run_cli("modules", "docs", "--check", database_url=sqlite_file_url(tmp_path / "x.db")))

    assert result.stdout.strip().endswith("docs/modules.md is up to date")


def test_modules_docs_check_fails_on_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "modules.md"
    stale.write_text("# Modules\n")

    result = run_cli("modules", "docs", "--check", "--output", str(stale),
                     database_url=sqlite_file_url(tmp_path / "x.db"))

    assert result.returncode == 1
    assert result.stderr.strip() == f"atrium: {stale} is stale: run `atrium modules docs` and commit it"
    assert stale.read_text() == "# Modules\n"  # --check writes nothing


# --- modules per process ----------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "setting"), [("worker", "WORKER"), ("serve", "API")])
def test_process_modules_must_be_enabled(tmp_path: Path, command: str, setting: str) -> None:
    result = run_cli(command, "--modules", "billing", database_url=sqlite_file_url(tmp_path / "x.db"),
                     ATRIUM_MODULES="users,items")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"atrium: ATRIUM_{setting}_MODULES: module 'billing' is not enabled (ATRIUM_MODULES=users,items)"
    ]


def test_a_worker_module_needs_its_dependencies_enabled(tmp_path: Path) -> None:
    result = run_cli("worker", "--modules", "billing", database_url=sqlite_file_url(tmp_path / "x.db"),
                     ATRIUM_MODULES="items,billing")

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "atrium: module 'billing' depends on 'users', which is not enabled (ATRIUM_MODULES=items,billing)"
    ]


def test_a_billing_only_worker_runs_only_the_billing_actors(tmp_path: Path) -> None:
    import signal
    import time

    url = sqlite_file_url(tmp_path / "worker.db")
    ok(run_cli("migrate", database_url=url))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    environment.update({"ATRIUM_ENV": "test", "ATRIUM_DATABASE_URL": url, "ATRIUM_SECRET_KEY": TEST_SECRET,
                        "ATRIUM_WORKER_METRICS_PORT": "0", "ATRIUM_LOG_LEVEL": "INFO"})
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "main", "worker", "--modules", "billing",
                                    "--threads", "1"], cwd=REPO, env=environment, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "worker started" not in log_path.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)

    assert "worker started: tasks=billing.charge_payment,billing.send_receipt" in log_path.read_text()
    assert status == 0, log_path.read_text()


# --- create-admin ---------------------------------------------------------------------------------


@pytest.fixture
def migrated_db(tmp_path: Path) -> Path:
    path = tmp_path / "admin.db"
    ok(run_cli("migrate", database_url=sqlite_file_url(path)))
    return path


def test_create_admin_creates_an_administrator(migrated_db: Path) -> None:
    result = ok(run_cli("create-admin", "--email", "Root@Example.COM", "--password", ADMIN_PASSWORD,
                        "--full-name", "Ada Root", database_url=sqlite_file_url(migrated_db)))

    rows = query(migrated_db, "SELECT id, email, is_admin, password_hash, full_name FROM users")
    assert len(rows) == 1
    _id, email, is_admin, password_hash, full_name = rows[0]
    assert email == "root@example.com"  # normalized like every other account
    assert bool(is_admin) is True
    assert password_hash.startswith("$argon2id$")
    assert ADMIN_PASSWORD not in password_hash
    assert full_name == "Ada Root"
    assert "admin created" in result.stdout
    assert "root@example.com" in result.stdout
    # The registration event is in the outbox, committed with the user.
    assert query(migrated_db, "SELECT name FROM outbox_messages") == [("users.UserRegistered",)]
    hasher = PasswordHasher(time_cost=1, memory_cost=1024)
    assert hasher.verify(password_hash, ADMIN_PASSWORD)
    assert not hasher.verify(password_hash, "wrong password")


def test_a_second_admin_with_the_same_email_fails_and_creates_nothing(migrated_db: Path) -> None:
    url = sqlite_file_url(migrated_db)
    ok(run_cli("create-admin", "--email", "root@example.com", "--password", ADMIN_PASSWORD,
               database_url=url))

    again = run_cli("create-admin", "--email", "ROOT@example.com", "--password", "another password",
                    database_url=url)

    assert again.returncode != 0
    assert "admin created" not in again.stdout
    assert query(migrated_db, "SELECT count(*) FROM users") == [(1,)]
    assert query(migrated_db, "SELECT count(*) FROM outbox_messages") == [(1,)]


def test_a_second_admin_with_the_same_email_is_a_clear_one_line_error(migrated_db: Path) -> None:
    url = sqlite_file_url(migrated_db)
    ok(run_cli("create-admin", "--email", "root@example.com", "--password", ADMIN_PASSWORD,
               database_url=url))

    again = run_cli("create-admin", "--email", "root@example.com", "--password", ADMIN_PASSWORD,
                    database_url=url)

    assert "Traceback" not in again.stderr
    # On library versions the fast path was not verified on, start-up's one warning says so first.
    lines = [line for line in again.stderr.strip().splitlines() if "fast path off:" not in line]
    assert lines == ["atrium: An account with this email already exists."]
    assert again.returncode == 2


@pytest.mark.parametrize(
    ("email", "password"),
    [
        pytest.param("root@example.com", "x", id="password-too-short"),
        pytest.param("not-an-email", ADMIN_PASSWORD, id="invalid-email"),
    ],
)
def test_create_admin_refuses_what_sign_up_refuses(migrated_db: Path, email: str, password: str) -> None:
    result = run_cli("create-admin", "--email", email, "--password", password,
                     database_url=sqlite_file_url(migrated_db))

    assert query(migrated_db, "SELECT count(*) FROM users") == [(0,)]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
