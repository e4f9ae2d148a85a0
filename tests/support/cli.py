"""The ``atrium`` command line as a real subprocess, with the test profile and cheap hashing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.settings import TEST_SECRET

REPO = Path(__file__).resolve().parent.parent.parent


def run_cli(*args: str, database_url: str, cwd: Path = REPO, stdin: str | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m main <args>`` (from the repo root unless ``cwd``); ``env`` adds ATRIUM_ variables,
    every other ATRIUM_ variable of the caller is left out. ``stdin`` is the text it reads; without it
    stdin is empty and not a terminal, so a command that would prompt (create-admin) never waits."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    environment.update({
        "ATRIUM_ENV": "test",
        "ATRIUM_DATABASE_URL": database_url,
        "ATRIUM_SECRET_KEY": TEST_SECRET,
        "ATRIUM_PASSWORD_TIME_COST": "1",
        "ATRIUM_PASSWORD_MEMORY_COST": "1024",
        **env,
    })
    given: dict[str, Any] = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run([sys.executable, "-m", "main", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120, check=False, **given)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``result`` after checking it exited 0 (its output in the message when not)."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def sqlite_file_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def migrated_sqlite(path: Path) -> Path:
    """``path``, a SQLite file ``atrium migrate`` made: a template for tests to copy."""
    ok(run_cli("migrate", database_url=sqlite_file_url(path)))
    return path


def copy_of(template: Path, path: Path) -> Path:
    shutil.copyfile(template, path)
    return path
