"""The ``atrium`` command line as a real subprocess, with the test profile and cheap hashing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.settings import TEST_SECRET

REPO = Path(__file__).resolve().parent.parent.parent


def run_cli(*args: str, database_url: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m main <args>`` (from the repo root unless ``cwd``); ``env`` adds ATRIUM_ variables,
    every other ATRIUM_ variable of the caller is left out."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    environment.update({
        "ATRIUM_ENV": "test",
        "ATRIUM_DATABASE_URL": database_url,
        "ATRIUM_SECRET_KEY": TEST_SECRET,
        "ATRIUM_PASSWORD_TIME_COST": "1",
        "ATRIUM_PASSWORD_MEMORY_COST": "1024",
        **env,
    })
    return subprocess.run([sys.executable, "-m", "main", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=120, check=False)
