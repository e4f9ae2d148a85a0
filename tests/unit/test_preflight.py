"""The one-line reasons the CLI gives for a server that did not answer (core/preflight.py), and what
counts as "the database is unavailable" (core/db/engine.py)."""

from __future__ import annotations

import socket
import sqlite3

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from core.db.engine import DatabaseTimeout, database_unavailable, timed_out
from core.edge.error_handlers import is_unavailable
from core.preflight import cause, database_problem, missing_table


class AmqpConnectionError(Exception):
    """pika's shape: the real causes travel in the arguments, not as ``__cause__``."""


@pytest.mark.parametrize(("error", "reason"), [
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (TimeoutError(), "no answer within 2 s"),
    (socket.gaierror(-2, "Name or service not known"), "unknown host"),
    (OSError(113, "No route to host"), "no route to host"),
    (asyncpg.InvalidCatalogNameError('database "nope" does not exist'), 'database "nope" does not exist'),
    (asyncpg.InvalidPasswordError('password authentication failed for user "atrium"'),
     'password authentication failed for user "atrium"'),
    (AmqpConnectionError([RuntimeError("workflow failed"), ConnectionRefusedError(111, "refused")]),
     "connection refused"),
])
def test_the_reason_is_short_and_names_the_cause(error: BaseException, reason: str) -> None:
    assert cause(error, 2.0) == reason


def test_a_wrapped_error_is_explained_by_what_it_wraps() -> None:
    outer = RuntimeError("connect failed")
    outer.__cause__ = ConnectionRefusedError(111, "Connection refused")

    assert cause(outer, 1.0) == "connection refused"


def test_the_driver_speaks_rather_than_sqlalchemy() -> None:
    from sqlalchemy.exc import InterfaceError

    error = InterfaceError(None, None, asyncpg.ClientConfigurationError("`sslmode` parameter must be one of: "
                                                                        "disable, allow"))

    assert cause(error) == "`sslmode` parameter must be one of: disable, allow"


def test_a_password_a_library_quoted_is_blanked() -> None:
    url = "amqp://guest:hunter2@mq:5672/"
    error = RuntimeError("could not log in to amqp://guest:hunter2@mq:5672/")

    assert "hunter2" not in cause(error, 1.0, url)


def test_database_problems_name_the_server_or_the_file() -> None:
    refused = ConnectionRefusedError(111, "Connection refused")

    assert database_problem("postgresql+asyncpg://u:pw@db.example:6543/atrium", refused, 5.0) == (
        "cannot connect to db.example:6543 (connection refused)")
    assert database_problem("postgresql+asyncpg://u:pw@db.example/atrium", TimeoutError(), 5.0) == (
        "cannot connect to db.example:5432 (no answer within 5 s)")
    assert database_problem("sqlite+aiosqlite:////no/such/dir/a.db",
                            sqlite3.OperationalError("unable to open database file"), 5.0) == (
        "cannot open the SQLite file /no/such/dir/a.db (unable to open database file)")


@pytest.mark.parametrize(("error", "table"), [
    (OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: users")), "users"),
    (ProgrammingError("SELECT", {}, asyncpg.UndefinedTableError('relation "user_sessions" does not exist')),
     "user_sessions"),
    (OperationalError("SELECT", {}, sqlite3.OperationalError("database is locked")), None),
])
def test_a_missing_table_is_recognised(error: BaseException, table: str | None) -> None:
    assert missing_table(error) == table


def test_a_client_timeout_is_an_outage_answered_503() -> None:
    error = timed_out("SELECT 1", TimeoutError())

    assert isinstance(error, DatabaseTimeout)
    assert isinstance(error, OperationalError)
    assert error.connection_invalidated
    assert database_unavailable(error)
    assert is_unavailable(error)
    assert "[parameters" not in str(error)  # never logged: they may hold personal data


def test_a_statement_the_server_cancelled_is_an_outage_too() -> None:
    canceled = DBAPIError("SELECT pg_sleep(9)", (), asyncpg.QueryCanceledError("canceling statement due to "
                                                                             "statement timeout"))

    assert database_unavailable(canceled)
    assert is_unavailable(canceled)
