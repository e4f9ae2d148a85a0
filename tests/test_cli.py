"""The ``atrium`` command line, run as real subprocesses against SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.security import PasswordHasher
from migrations import downgrade
from tests.support.cli import ok, run_cli, sqlite_file_url
from tests.support.db import table_names
from tests.support.paused import paused
from tests.support.pg_cluster import PgCluster, require_pg_cluster
from tests.support.services import POSTGRES_HOST, POSTGRES_PORT, postgres_dsn, require
from tests.support.settings import TEST_SECRET, make_settings
from tests.support.smtp import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCHEMA = {"users", "outbox_messages", "inbox_messages", "alembic_version"}
ADMIN_PASSWORD = "correct horse battery staple"




def query(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as connection:
        return list(connection.execute(sql, params))


# --- migrate --------------------------------------------------------------------------------------


def head_revisions() -> set[str]:
    """The head of core's history and of every enabled module's own history."""
    from alembic.script import ScriptDirectory

    from migrations import alembic_config, targets

    # Not every head on disk: a module that is there but not enabled (README "Add a module", before
    # its line is added) is not migrated.
    settings = make_settings()
    script = ScriptDirectory.from_config(alembic_config(settings))
    return {revision.revision for target in targets(settings) for revision in script.get_revisions(target)
            if revision is not None}


async def test_migrate_creates_the_schema_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "atrium.db"  # parent folders are created too
    url = sqlite_file_url(path)

    result = ok(run_cli("migrate", database_url=url))

    applied = [line.split()[1] for line in result.stdout.splitlines()]  # "applied <revision> (<message>)"
    assert {"core_0001", "users_0001"} <= set(applied)
    assert set(applied) >= head_revisions()
    assert path.exists()
    assert await table_names(url) >= SCHEMA
    assert {row[0] for row in query(path, "SELECT version_num FROM alembic_version")} == head_revisions()


async def test_migrate_twice_on_sqlite_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "atrium.db"
    url = sqlite_file_url(path)
    ok(run_cli("migrate", database_url=url))

    again = ok(run_cli("migrate", database_url=url))

    assert again.stdout.startswith("schema up to date")
    assert len(again.stdout.splitlines()) == 1
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
    from tooling.verify import discover

    result = ok(run_cli("modules", "verify", database_url=sqlite_file_url(tmp_path / "unused.db")))

    # Every module package on disk, so a module added by the README's "Add a module" counts too.
    on_disk = discover()
    assert set(make_settings().modules) <= set(on_disk)
    assert result.stdout.startswith(f"modules verify: ok ({', '.join(on_disk)}; rules: load, cycle, import")
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


# --- a bad setting is one line naming it, exit 2, before anything is opened -----------------------

PASSWORD = "hunter2-not-to-be-echoed"
PG_URL = f"postgresql+asyncpg://atrium:{PASSWORD}@db.example:5432/atrium"
CREATE_ADMIN = ("create-admin", "--email", "root@example.com", "--password", ADMIN_PASSWORD)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed, after checking the rest of the contract: exit 2,
    nothing on stdout, no traceback, no password from a URL."""
    # On library versions the fast path was not verified on, start-up's one warning says so first.
    lines = [line for line in result.stderr.strip().splitlines() if "fast path off:" not in line]
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    assert PASSWORD not in result.stderr
    return lines[0]


BAD_SETTINGS = [
    pytest.param({"ATRIUM_DATABASE_URL": f"postgresql://atrium:{PASSWORD}@db:5432/atrium"},
                 "ATRIUM_DATABASE_URL: postgresql:// names no driver; use postgresql+asyncpg:// "
                 "(Atrium's drivers are asynchronous)", id="database-url-without-asyncpg"),
    pytest.param({"ATRIUM_DATABASE_URL": f"postgresql+psycopg://atrium:{PASSWORD}@db/atrium"},
                 "ATRIUM_DATABASE_URL: postgresql+psycopg:// the driver 'psycopg' is not supported; use "
                 "postgresql+asyncpg://", id="database-url-psycopg"),
    pytest.param({"ATRIUM_DATABASE_URL": "sqlite:///./var/atrium.db"},
                 "ATRIUM_DATABASE_URL: sqlite:// names no driver; use sqlite+aiosqlite:///",
                 id="database-url-sync-sqlite"),
    pytest.param({"ATRIUM_DATABASE_URL": f"mysql://atrium:{PASSWORD}@db/atrium"},
                 "ATRIUM_DATABASE_URL: mysql:// is not supported; expected postgresql+asyncpg://",
                 id="database-url-mysql"),
    pytest.param({"ATRIUM_DATABASE_URL": "garbage"},
                 "ATRIUM_DATABASE_URL is not a database URL", id="database-url-garbage"),
    pytest.param({"ATRIUM_DATABASE_URL": f"postgresql+asyncpg://atrium:{PASSWORD}@db:99999/atrium"},
                 "ATRIUM_DATABASE_URL: port 99999 is out of range (1-65535)", id="database-port-range"),
    pytest.param({"ATRIUM_DATABASE_URL": f"postgresql+asyncpg://atrium:{PASSWORD}@db:pg/atrium"},
                 "ATRIUM_DATABASE_URL is not a database URL (or its port is not a number)",
                 id="database-port-not-a-number"),
    pytest.param({"ATRIUM_DATABASE_URL": f"{PG_URL}?sslmode=require"},
                 "ATRIUM_DATABASE_URL: ?sslmode= is not an asyncpg connection option; asyncpg calls it ssl",
                 id="database-libpq-option"),
    pytest.param({"ATRIUM_DATABASE_URL": ""}, "ATRIUM_DATABASE_URL is required (e.g. postgresql+asyncpg://",
                 id="database-url-empty"),
    pytest.param({"ATRIUM_DATABASE_URL": PG_URL,
                  "ATRIUM_DATABASE_REPLICA_URLS": f"postgresql://atrium:{PASSWORD}@replica/atrium"},
                 "ATRIUM_DATABASE_REPLICA_URLS: postgresql:// names no driver; use postgresql+asyncpg://",
                 id="replica-url-without-asyncpg"),
    pytest.param({"ATRIUM_CACHE_BACKEND": "redis"},
                 "ATRIUM_REDIS_URL is required with ATRIUM_CACHE_BACKEND=redis (e.g. redis://host:6379/0)",
                 id="cache-redis-without-url"),
    pytest.param({"ATRIUM_RATE_LIMIT_BACKEND": "redis"},
                 "ATRIUM_REDIS_URL is required with ATRIUM_RATE_LIMIT_BACKEND=redis",
                 id="rate-limiter-redis-without-url"),
    pytest.param({"ATRIUM_CACHE_BACKEND": "redis", "ATRIUM_REDIS_URL": "garbage"},
                 "ATRIUM_REDIS_URL is not a URL; expected redis://host:6379/0", id="redis-url-garbage"),
    pytest.param({"ATRIUM_REDIS_URL": f"http://cache:{PASSWORD}@cache:6379/0"},
                 "ATRIUM_REDIS_URL: http:// does not work; expected redis://", id="redis-url-scheme"),
    pytest.param({"ATRIUM_REDIS_URL": "redis://cache:6379/zero"},
                 "ATRIUM_REDIS_URL: the Redis database /zero is not a number (e.g. /0)", id="redis-url-db"),
    pytest.param({"ATRIUM_REDIS_URL": "redis://cache:637900/0"},
                 "ATRIUM_REDIS_URL: the port is not a number from 1 to 65535", id="redis-url-port"),
    pytest.param({"ATRIUM_BROKER_BACKEND": "redis", "ATRIUM_BROKER_URL": "garbage"},
                 "ATRIUM_BROKER_URL is not a URL; expected redis://host:6379/0", id="broker-url-garbage"),
    pytest.param({"ATRIUM_BROKER_BACKEND": "rabbitmq", "ATRIUM_BROKER_URL": "redis://queue:6379/1"},
                 "ATRIUM_BROKER_URL: redis:// does not work with ATRIUM_BROKER_BACKEND=rabbitmq; expected "
                 "amqp://", id="broker-url-scheme"),
    pytest.param({"ATRIUM_BROKER_BACKEND": "rabbitmq"},
                 "ATRIUM_BROKER_URL is required with ATRIUM_BROKER_BACKEND=rabbitmq",
                 id="broker-without-url"),
    pytest.param({"ATRIUM_LOG_LEVEL": "loud"}, "ATRIUM_LOG_LEVEL='loud' is not a level; use one of TRACE,",
                 id="log-level"),
    pytest.param({"ATRIUM_PORT": "80000"}, "ATRIUM_PORT: Input should be less than or equal to 65535",
                 id="port-range"),
    pytest.param({"ATRIUM_PORT": "http"}, "ATRIUM_PORT: Input should be a valid integer",
                 id="port-not-a-number"),
    pytest.param({"ATRIUM_SMTP_PORT": "0"}, "ATRIUM_SMTP_PORT: Input should be greater than or equal to 1",
                 id="smtp-port"),
    pytest.param({"ATRIUM_DATABASE_STATEMENT_TIMEOUT": "0"},
                 "ATRIUM_DATABASE_STATEMENT_TIMEOUT: Input should be greater than 0", id="statement-timeout"),
    pytest.param({"ATRIUM_DATABASE_CONNECT_TIMEOUT": "-1"},
                 "ATRIUM_DATABASE_CONNECT_TIMEOUT: Input should be greater than 0", id="connect-timeout"),
    pytest.param({"ATRIUM_SMTP_TIMEOUT": "0"}, "ATRIUM_SMTP_TIMEOUT: Input should be greater than 0",
                 id="smtp-timeout"),
    pytest.param({"ATRIUM_DATABASE_POOL_SIZE": "0"},
                 "ATRIUM_DATABASE_POOL_SIZE: Input should be greater than or equal to 1", id="pool-size"),
    pytest.param({"ATRIUM_AUTO_MIGRATE": "maybe"}, "ATRIUM_AUTO_MIGRATE: Input should be a valid boolean",
                 id="boolean"),
    pytest.param({"ATRIUM_CACHE_BACKEND": "memcached"}, "ATRIUM_CACHE_BACKEND: Input should be 'memory',",
                 id="unknown-backend"),
    pytest.param({"ATRIUM_ROOT_PATH": "atrium/"},
                 "ATRIUM_ROOT_PATH='atrium/' must start with / and not end with one", id="root-path"),
    pytest.param({"ATRIUM_PAYMENTS_URL": "gateway.example.com"},
                 "ATRIUM_PAYMENTS_URL is not a URL; expected https://host or http://host:8080",
                 id="payments-url"),
    pytest.param({"ATRIUM_JOB_MIN_BACKOFF_MS": "9000", "ATRIUM_JOB_MAX_BACKOFF_MS": "1000"},
                 "ATRIUM_JOB_MIN_BACKOFF_MS is larger than ATRIUM_JOB_MAX_BACKOFF_MS", id="backoff-order"),
    pytest.param({"ATRIUM_ENV": "prod"}, "ATRIUM_ENV='prod' is not one of development, test, production",
                 id="env"),
    pytest.param({"ATRIUM_ENV": "production", "ATRIUM_DATABASE_URL": PG_URL, "ATRIUM_SMTP_HOST": "smtp",
                  "ATRIUM_PAYMENTS_BACKEND": "http", "ATRIUM_PAYMENTS_URL": "https://gateway.example",
                  "ATRIUM_PAYMENTS_API_KEY": "key",
                  "ATRIUM_PAYMENTS_WEBHOOK_SECRET": "whsec-0123456789abcdef"},
                 "ATRIUM_REDIS_URL is required with ATRIUM_CACHE_BACKEND=redis",
                 id="production-without-redis"),
    pytest.param({"ATRIUM_EMAIL_BACKEND": "smtp"},
                 "ATRIUM_SMTP_HOST is required with ATRIUM_EMAIL_BACKEND=smtp", id="smtp-without-host"),
    pytest.param({"ATRIUM_PAYMENTS_BACKEND": "http"},
                 "ATRIUM_PAYMENTS_URL is required with ATRIUM_PAYMENTS_BACKEND=http",
                 id="payments-without-url"),
    pytest.param({"ATRIUM_SECRET_KEY": ""}, "ATRIUM_SECRET_KEY is empty; set it, or unset the variable",
                 id="secret-empty"),
    pytest.param({"ATRIUM_MODULES": ""}, "ATRIUM_MODULES is empty; name the modules to run",
                 id="no-modules"),
    pytest.param({"ATRIUM_DATABASE_URL": f"{PG_URL}?ssl=true"},
                 "ATRIUM_DATABASE_URL: ?ssl= must be one of disable, allow, prefer, require, verify-ca, "
                 "verify-full", id="database-ssl-mode"),
]


def run_cli_here(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], cwd: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """``main.cli(args)`` in this process, with ``run_cli``'s environment: the same exit status and
    output, without a ~2 s interpreter start per case. What is refused before anything is opened
    needs no process of its own; ``test_every_command_refuses_a_bad_setting_alike`` runs the real
    command line for each command."""
    import main

    for name in [n for n in os.environ if n.upper().startswith("ATRIUM_")]:
        monkeypatch.delenv(name)
    for name, value in {"ATRIUM_ENV": "test", "ATRIUM_SECRET_KEY": TEST_SECRET, **env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(cwd)  # no .env from the repository
    capfd.readouterr()
    status = main.cli(list(args))
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["atrium", *args], status, out, err)


@pytest.mark.parametrize(("env", "expected"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    env: dict[str, str], expected: str,
) -> None:
    database = tmp_path / "atrium.db"

    result = run_cli_here(monkeypatch, capfd, tmp_path, "migrate",
                          **{"ATRIUM_DATABASE_URL": sqlite_file_url(database), **env})

    line = one_line(result)
    assert line.startswith(f"atrium: {expected}"), line
    assert not database.exists()  # refused before anything was opened


@pytest.mark.parametrize("command", [("serve",), ("worker",), ("migrate",), CREATE_ADMIN, ("modules",),
                                     ("modules", "verify")], ids=" ".join)
@pytest.mark.parametrize(("env", "expected"), [
    ({"ATRIUM_DATABASE_URL": f"postgresql://atrium:{PASSWORD}@127.0.0.1:5432/atrium"},
     "atrium: ATRIUM_DATABASE_URL: postgresql:// names no driver; use postgresql+asyncpg://"),
    ({"ATRIUM_BROKER_BACKEND": "redis", "ATRIUM_BROKER_URL": "garbage"},
     "atrium: ATRIUM_BROKER_URL is not a URL; expected redis://host:6379/0"),
], ids=["database-url", "broker-url"])
def test_every_command_refuses_a_bad_setting_alike(
    tmp_path: Path, command: tuple[str, ...], env: dict[str, str], expected: str,
) -> None:
    database = tmp_path / "atrium.db"

    result = run_cli(*command, database_url=sqlite_file_url(database), ATRIUM_PORT=str(free_port()), **env)

    assert one_line(result).startswith(expected)
    assert not database.exists()


@pytest.fixture
def dotenv_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the .env file itself: the suite's switch that keeps a developer's .env
    away from the commands the tests run (tests/conftest.py) is off for them."""
    monkeypatch.delenv("PYTHON_DOTENV_DISABLED", raising=False)


@pytest.mark.usefixtures("dotenv_read")
def test_a_dotenv_line_that_is_not_a_setting_is_one_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("# local settings\nATRIUM_PORT=8001\nthis is not a setting\n")

    result = run_cli("modules", database_url=sqlite_file_url(tmp_path / "x.db"), cwd=tmp_path)

    assert one_line(result) == "atrium: .env line 3: not NAME=value (a comment starts with #)"


@pytest.mark.usefixtures("dotenv_read")
def test_a_bad_value_in_dotenv_is_the_same_line_as_in_the_environment(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"ATRIUM_REDIS_URL=http://cache:{PASSWORD}@cache:6379/0\n")

    result = run_cli("worker", database_url=sqlite_file_url(tmp_path / "x.db"), cwd=tmp_path)

    assert one_line(result).startswith("atrium: ATRIUM_REDIS_URL: http:// does not work; expected redis://")


@pytest.mark.usefixtures("dotenv_read")
def test_a_dotenv_file_that_is_not_text_is_one_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"ATRIUM_PORT=8001\n\xff\xfe\x00garbage\n")

    result = run_cli("migrate", database_url=sqlite_file_url(tmp_path / "x.db"), cwd=tmp_path)

    assert one_line(result) == "atrium: .env is not UTF-8 text"
    assert not (tmp_path / "x.db").exists()


# --- a server that does not answer at a command's start: one line naming the setting, exit 2 -----


@pytest.mark.parametrize("command", [("migrate",), CREATE_ADMIN, ("worker",), ("serve",)], ids=" ".join)
def test_a_database_nobody_listens_at_is_one_line(command: tuple[str, ...]) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+asyncpg://atrium:{PASSWORD}@127.0.0.1:{port}/atrium"

    result = run_cli(*command, database_url=url, ATRIUM_WORKER_METRICS_PORT="0", ATRIUM_PORT=str(free_port()))

    assert one_line(result) == (
        f"atrium: ATRIUM_DATABASE_URL: cannot connect to 127.0.0.1:{port} (connection refused)"
    )


@pytest.mark.postgres
def test_a_database_that_does_not_exist_is_one_line() -> None:
    require("postgres")
    url = postgres_dsn("atrium_no_such_database").replace("postgres@", f"postgres:{PASSWORD}@", 1)

    result = run_cli("migrate", database_url=url)

    assert one_line(result) == (f"atrium: ATRIUM_DATABASE_URL: cannot connect to {POSTGRES_HOST}:"
                                f'{POSTGRES_PORT} (database "atrium_no_such_database" does not exist)')


def test_an_sqlite_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    result = run_cli("migrate", database_url=sqlite_file_url(tmp_path))  # a folder, not a file

    assert one_line(result) == (
        f"atrium: ATRIUM_DATABASE_URL: cannot open the SQLite file {tmp_path} (unable to open database file)"
    )


@pytest.mark.parametrize(("backend", "scheme"), [("redis", "redis://"),
                                                 ("rabbitmq", f"amqp://guest:{PASSWORD}@")])
def test_a_worker_names_a_broker_nobody_listens_at(migrated_db: Path, backend: str, scheme: str) -> None:
    port = free_port()

    result = run_cli("worker", database_url=sqlite_file_url(migrated_db), ATRIUM_BROKER_BACKEND=backend,
                     ATRIUM_BROKER_URL=f"{scheme}127.0.0.1:{port}/", ATRIUM_WORKER_METRICS_PORT="0")

    assert one_line(result) == (
        f"atrium: ATRIUM_BROKER_URL: cannot connect to 127.0.0.1:{port} (connection refused)"
    )


@pytest.mark.rabbitmq
def test_a_worker_names_a_broker_that_refuses_its_login(migrated_db: Path) -> None:
    require("rabbitmq")

    result = run_cli("worker", database_url=sqlite_file_url(migrated_db), ATRIUM_BROKER_BACKEND="rabbitmq",
                     ATRIUM_BROKER_URL=f"amqp://guest:{PASSWORD}@127.0.0.1:5672/",
                     ATRIUM_WORKER_METRICS_PORT="0")

    assert one_line(result) == ("atrium: ATRIUM_BROKER_URL: cannot connect to 127.0.0.1:5672 "
                                "(authentication failed: check the user and password)")


def test_a_worker_on_a_database_never_migrated_says_to_migrate(tmp_path: Path) -> None:
    result = run_cli("worker", database_url=sqlite_file_url(tmp_path / "empty.db"),
                     ATRIUM_WORKER_METRICS_PORT="0")

    assert one_line(result) == ("atrium: ATRIUM_DATABASE_URL: the database has no table "
                                "'event_publications'; run `atrium migrate` first")


def test_create_admin_on_a_database_never_migrated_says_to_migrate(tmp_path: Path) -> None:
    result = run_cli(*CREATE_ADMIN, database_url=sqlite_file_url(tmp_path / "empty.db"))

    assert re.fullmatch(r"atrium: ATRIUM_DATABASE_URL: the database has no table '\w+'; "
                        r"run `atrium migrate` first", one_line(result))


@pytest.mark.postgres
async def test_create_admin_on_a_postgres_database_never_migrated_says_to_migrate(
    pg_database_factory: Callable[[], Any],
) -> None:
    url = await pg_database_factory()

    result = await asyncio.to_thread(run_cli, *CREATE_ADMIN, database_url=url)

    assert re.fullmatch(r"atrium: ATRIUM_DATABASE_URL: the database has no table '\w+'; "
                        r"run `atrium migrate` first", one_line(result))


def test_migrate_to_a_revision_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    result = run_cli("migrate", "nosuchrevision", database_url=sqlite_file_url(tmp_path / "atrium.db"))

    assert one_line(result).startswith("atrium: migrate: ")


@pytest.mark.slow
def test_migrate_against_a_paused_postgres_gives_up_after_the_connect_timeout() -> None:
    require_pg_cluster()
    with PgCluster("paused-migrate") as pg:
        url = pg.url("postgres").replace("postgres@", f"postgres:{PASSWORD}@", 1)
        with paused(pg):
            started = time.monotonic()
            result = run_cli("migrate", database_url=url, ATRIUM_DATABASE_CONNECT_TIMEOUT="1")
            took = time.monotonic() - started

    assert one_line(result) == f"atrium: ATRIUM_DATABASE_URL: cannot connect to 127.0.0.1:{pg.port} " \
                               "(no answer within 1 s)"
    # The interpreter's start (importing main: 1.5 s of CPU with the bytecode scripts/bootstrap writes,
    # about 4 s where it is missing and PYTHONDONTWRITEBYTECODE is set, twice that with the suite's
    # other lanes busy) plus twice the connect timeout: a hang on the paused server would take minutes.
    assert took < 20, f"{took:.1f}s"
    print(f"\n[paused postgres] `atrium migrate` gave up in {took:.2f}s (connect timeout 1 s)")


@pytest.mark.parametrize(("args", "says"), [
    (("serve", "--port", "99999"), "argument --port: '99999' is not a port (1-65535)"),
    (("serve", "--workers", "0"), "argument --workers: '0' is not a whole number of at least 1"),
    (("worker", "--threads", "0"), "argument --threads: '0' is not a whole number of at least 1"),
], ids=["port", "workers", "threads"])
def test_a_bad_count_or_port_on_the_command_line_is_refused(
    tmp_path: Path, args: tuple[str, ...], says: str,
) -> None:
    result = run_cli(*args, database_url=sqlite_file_url(tmp_path / "x.db"))

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(f"error: {says}")  # after argparse's usage line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.db").exists()  # nothing started (uvicorn would wrap 99999 round to 34463)
