"""Every walkthrough of README.md and docs/ runs as written (scripts/walkthroughs), in a fresh clone.

The script creates the clone's own ``.venv`` from uv.lock (as a new user's first ``make run`` does),
so it needs the network or warm download caches, and the real servers "Running in production" names.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import require, require_program

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "walkthroughs"


def _walkthrough_names() -> list[str]:
    source = SCRIPT.read_text(encoding="utf-8")
    return [line.split('"')[1] for line in source.splitlines() if line.strip().startswith("Walkthrough(\"")]


def test_every_walkthrough_runs_as_written() -> None:
    require("postgres")
    require("redis")
    for program, package in (("git", "git"), ("rsync", "rsync"), ("make", "make"), ("curl", "curl"),
                             ("jq", "jq"), ("createdb", "postgresql-client"),
                             ("redis-cli", "redis-tools")):
        require_program(program, package=package)

    run = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, check=False)

    output = run.stdout + run.stderr
    assert run.returncode == 0, f"scripts/walkthroughs failed:\n{output[-8000:]}"
    print(output[-1500:])
    # Each walkthrough ran to its end, so none was left out by a renamed or missing marker.
    for name in _walkthrough_names():
        assert f"=== {name}: ok in" in run.stdout, f"walkthrough {name!r} did not finish:\n{output[-4000:]}"
    assert "all green" in run.stdout
