"""The command line's finish (issue 16): help and defaults, ``--version``, create-admin's password
from a prompt or stdin, a quiet ``migrate``, ``make run ARGS=...`` and a busy port, and a server
that stops without leaking semaphores."""

from __future__ import annotations

import argparse
import io
import os
import pty
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.security import PasswordHasher
from main import UsageError, _parser, admin_password
from tests.support.cli import REPO, ok, run_cli, sqlite_file_url
from tests.support.settings import TEST_SECRET
from tests.support.smtp import free_port

PASSWORD = "correct horse battery staple"
REVISION_LINE = re.compile(r"applied \w+ \(.+\)")




def errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr's lines, without the fast path's start-up note on library versions it was not verified on."""
    return [line for line in result.stderr.strip().splitlines() if "fast path off:" not in line]


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed: exit 2, nothing on stdout, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = errors(result)
    assert len(lines) == 1, result.stderr
    return lines[0]


def users(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as connection:
        return list(connection.execute("SELECT email, is_admin, password_hash FROM users"))


# --- help and --version -----------------------------------------------------------------------------


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command's parser, all levels down."""
    yield parser
    for action in parser._actions:  # argparse offers no public walk over a parser's arguments
        if isinstance(action.choices, dict):  # a sub-command action: name -> its parser
            for child in action.choices.values():
                yield from parsers(child)


def test_every_option_has_help_that_shows_its_default() -> None:
    missing: list[str] = []
    for parser in parsers(_parser()):
        parser.format_help()  # a bad %-placeholder in any help text raises here
        for action in parser._actions:
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name}: no help")
            elif action.required or action.dest in ("help", "version"):
                continue
            elif "default" not in action.help:
                missing.append(f"{name}: help does not say its default")
    assert missing == []


def test_an_option_left_to_the_settings_names_the_setting() -> None:
    serve = next(p for p in parsers(_parser()) if p.prog == "atrium serve")
    text = " ".join(serve.format_help().split())

    assert "ATRIUM_PORT or 8000" in text
    assert "ATRIUM_HOST or 127.0.0.1" in text


def test_the_password_option_warns_where_the_password_ends_up() -> None:
    admin = next(p for p in parsers(_parser()) if p.prog == "atrium create-admin")
    text = " ".join(admin.format_help().split())

    assert "shell history" in text
    assert "--password-stdin" in text


@pytest.mark.slow
def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    result = ok(run_cli("--version", database_url=sqlite_file_url(tmp_path / "unused.db")))

    assert result.stdout == f"atrium {version('atrium')}\n"
    assert not (tmp_path / "unused.db").exists()


# --- create-admin: the password from a prompt or stdin ---------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def answers(*typed: str) -> Callable[[str], str]:
    """A prompt that answers ``typed`` in turn, then EOF (as Ctrl-D at a terminal)."""
    queue = list(typed)

    def prompt(question: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return prompt


def admin_args(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["create-admin", "--email", "root@example.com", *argv])


class TestAdminPassword:
    def test_a_terminal_is_asked_twice(self) -> None:
        assert admin_password(admin_args(), Terminal(), answers(PASSWORD, PASSWORD)) == PASSWORD

    def test_two_different_answers_are_refused(self) -> None:
        with pytest.raises(UsageError, match="the two passwords differ"):
            admin_password(admin_args(), Terminal(), answers(PASSWORD, PASSWORD + "!"))

    def test_no_answer_is_refused(self) -> None:
        with pytest.raises(UsageError, match="no password typed"):
            admin_password(admin_args(), Terminal(), answers())

    def test_without_a_terminal_it_names_password_stdin(self) -> None:
        with pytest.raises(UsageError, match="--password-stdin"):
            admin_password(admin_args(), io.StringIO(PASSWORD + "\n"), answers(PASSWORD, PASSWORD))

    def test_stdin_gives_its_first_line_as_it_is(self) -> None:
        given = io.StringIO(f"  {PASSWORD}  \r\nsecond line\n")

        assert admin_password(admin_args("--password-stdin"), given) == f"  {PASSWORD}  "

    def test_an_empty_stdin_is_refused(self) -> None:
        with pytest.raises(UsageError, match="stdin is empty"):
            admin_password(admin_args("--password-stdin"), io.StringIO(""))

    def test_the_password_option_still_works(self) -> None:
        assert admin_password(admin_args("--password", PASSWORD), Terminal(), answers()) == PASSWORD


@pytest.mark.slow
def test_create_admin_reads_the_password_from_stdin(migrated_db: Path) -> None:
    password = f"  {PASSWORD} with spaces  "

    result = ok(run_cli("create-admin", "--email", "root@example.com", "--password-stdin",
                        database_url=sqlite_file_url(migrated_db), stdin=f"{password}\n"))

    assert "admin created" in result.stdout
    [(email, is_admin, password_hash)] = users(migrated_db)
    assert (email, bool(is_admin)) == ("root@example.com", True)
    assert PasswordHasher(time_cost=1, memory_cost=1024).verify(password_hash, password)


@pytest.mark.slow
def test_create_admin_refuses_a_weak_password_from_stdin_like_sign_up(migrated_db: Path) -> None:
    result = run_cli("create-admin", "--email", "root@example.com", "--password-stdin",
                     database_url=sqlite_file_url(migrated_db), stdin="short\n")

    assert one_line(result).startswith("atrium: The password must be 8 to ")
    assert users(migrated_db) == []


@pytest.mark.slow
@pytest.mark.parametrize(("args", "stdin", "says"), [
    ((), None, "atrium: create-admin: no terminal to ask for the password; use --password-stdin"),
    (("--password-stdin",), "", "atrium: create-admin: --password-stdin: stdin is empty"),
], ids=["no-terminal", "empty-stdin"])
def test_create_admin_without_a_password_is_one_line_and_opens_nothing(
    tmp_path: Path, args: tuple[str, ...], stdin: str | None, says: str,
) -> None:
    database = tmp_path / "never.db"

    result = run_cli("create-admin", "--email", "root@example.com", *args,
                     database_url=sqlite_file_url(database), stdin=stdin)

    assert one_line(result).startswith(says)
    assert not database.exists()


@pytest.mark.slow
def test_create_admin_takes_one_way_of_giving_the_password(tmp_path: Path) -> None:
    result = run_cli("create-admin", "--email", "root@example.com", "--password", PASSWORD,
                     "--password-stdin", database_url=sqlite_file_url(tmp_path / "x.db"), stdin=PASSWORD)

    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr


def _read_until(fd: int, marker: bytes | None, seen: bytearray, within: float = 60.0) -> None:
    """Read the terminal's output into ``seen`` until ``marker`` shows (None: until it closes)."""
    deadline = time.monotonic() + within
    while marker is None or marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"waited for {marker!r}; the terminal showed {bytes(seen)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            assert marker is None, f"the terminal closed before {marker!r}: {bytes(seen)!r}"
            return
        seen += chunk


@pytest.mark.slow
def test_create_admin_asks_twice_on_a_terminal_without_echo(migrated_db: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    environment.update({"ATRIUM_ENV": "test", "ATRIUM_DATABASE_URL": sqlite_file_url(migrated_db),
                        "ATRIUM_SECRET_KEY": TEST_SECRET, "ATRIUM_PASSWORD_TIME_COST": "1",
                        "ATRIUM_PASSWORD_MEMORY_COST": "1024"})
    argv = [sys.executable, "-m", "main", "create-admin", "--email", "tty@example.com"]
    pid, fd = pty.fork()  # the child's controlling terminal is ours: getpass reads /dev/tty
    if pid == 0:  # pragma: no cover - the child
        try:
            os.chdir(REPO)
            os.execve(sys.executable, argv, environment)
        finally:
            os._exit(127)
    seen = bytearray()
    try:
        _read_until(fd, b"Password: ", seen)
        os.write(fd, PASSWORD.encode() + b"\n")
        _read_until(fd, b"Password (again): ", seen)
        os.write(fd, PASSWORD.encode() + b"\n")
        _read_until(fd, None, seen)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)

    assert os.waitstatus_to_exitcode(status) == 0, bytes(seen)
    assert b"admin created" in seen
    assert PASSWORD.encode() not in seen  # not echoed
    [(email, _admin, password_hash)] = users(migrated_db)
    assert email == "tty@example.com"
    assert PasswordHasher(time_cost=1, memory_cost=1024).verify(password_hash, PASSWORD)


# --- a quiet migrate ------------------------------------------------------------------------------


@pytest.mark.slow
def test_migrate_at_info_prints_one_line_per_revision_and_nothing_else(tmp_path: Path) -> None:
    url = sqlite_file_url(tmp_path / "atrium.db")
    info = {"ATRIUM_LOG_LEVEL": "INFO", "ATRIUM_LOG_JSON": "true"}  # production's log settings

    first = ok(run_cli("migrate", database_url=url, **info))
    again = ok(run_cli("migrate", database_url=url, **info))

    applied = first.stdout.splitlines()
    assert applied, first.stdout
    assert all(REVISION_LINE.fullmatch(line) for line in applied), first.stdout
    assert any(line.startswith("applied core_0001 ") for line in applied)
    assert errors(first) == []  # no "Context impl", "Will assume ... DDL", "setup plugin", "Pool ..."
    assert again.stdout.splitlines() == ["schema up to date (head: core, users, items, billing)"]
    assert errors(again) == []


@pytest.mark.slow
def test_migrate_at_debug_says_the_rest(tmp_path: Path) -> None:
    result = ok(run_cli("migrate", database_url=sqlite_file_url(tmp_path / "atrium.db"),
                        ATRIUM_LOG_LEVEL="DEBUG"))

    assert "Context impl SQLiteImpl" in result.stderr
    assert "Running upgrade" in result.stderr


@pytest.mark.slow
@pytest.mark.postgres
async def test_migrate_on_the_production_profile_is_quiet_at_info(
    pg_database_factory: Callable[[], Any],
) -> None:
    import asyncio

    url = await pg_database_factory()
    production = {"ATRIUM_ENV": "production", "ATRIUM_SECRET_KEY": TEST_SECRET,
                  "ATRIUM_REDIS_URL": "redis://127.0.0.1:6379/0",
                  "ATRIUM_BROKER_URL": "redis://127.0.0.1:6379/0", "ATRIUM_SMTP_HOST": "smtp.example",
                  "ATRIUM_PAYMENTS_URL": "https://gateway.example", "ATRIUM_PAYMENTS_API_KEY": "key",
                  "ATRIUM_PAYMENTS_WEBHOOK_SECRET": "whsec-0123456789abcdef"}

    first = ok(await asyncio.to_thread(run_cli, "migrate", database_url=url, **production))
    again = ok(await asyncio.to_thread(run_cli, "migrate", database_url=url, **production))

    assert all(REVISION_LINE.fullmatch(line) for line in first.stdout.splitlines()), first.stdout
    assert errors(first) == []
    assert len(again.stdout.splitlines()) == 1
    assert again.stdout.startswith("schema up to date")
    assert errors(again) == []


# --- make run ARGS=..., and a port already in use ----------------------------------------------------


def test_make_run_passes_args_to_atrium_serve() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")

    dry = subprocess.run(["make", "-n", "run", "ARGS=--port 8123 --workers 2"], cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=30)

    assert "scripts/serve --port 8123 --workers 2" in dry.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["option", "setting"])
def test_serve_on_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, how: str) -> None:
    database = tmp_path / "never.db"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args, env = (("--port", str(port)), {}) if how == "option" else ((), {"ATRIUM_PORT": str(port)})

        result = run_cli("serve", *args, database_url=sqlite_file_url(database), **env)

    assert one_line(result) == (f"atrium: serve: port {port} on 127.0.0.1 is in use; pick another with "
                                f"--port (make run ARGS='--port {port + 1}')")
    assert not database.exists()  # refused before anything was opened


# --- serve --workers 2 stops cleanly ----------------------------------------------------------------


@pytest.mark.slow
def test_serve_with_two_workers_stops_on_sigterm_without_leaked_semaphores(tmp_path: Path) -> None:
    url = sqlite_file_url(tmp_path / "atrium.db")
    ok(run_cli("migrate", database_url=url))
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ATRIUM_", "PROMETHEUS_"))}
    environment.update({"ATRIUM_ENV": "development", "ATRIUM_DATABASE_URL": url,
                        "ATRIUM_AUTO_MIGRATE": "false", "ATRIUM_LOG_LEVEL": "INFO",
                        "ATRIUM_METRICS_MULTIPROC_DIR": str(tmp_path / "metrics")})
    stderr_path = tmp_path / "serve.err"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "main", "serve", "--workers", "2",
                                    "--port", str(port)], cwd=REPO, env=environment,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        time.sleep(0.5)  # both workers up (the first answer needs only one)
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=20)
        took = time.monotonic() - stopping
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    output = stderr_path.read_text()
    assert status == 0, output
    assert took < 10, f"{took:.1f}s\n{output}"
    assert "leaked semaphore" not in output, output
    assert "resource_tracker" not in output, output
