"""``atrium new-module``: the generated module works with no other edit, and bad names are refused."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from core.module import ModuleError
from tooling.scaffold import check_name, entity_of, new_module

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "var", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
        ".import_linter_cache", ".mypy_cache", "build", "dist"}


class TestNames:
    @pytest.mark.parametrize(("name", "fragment"), [
        ("Notes", "a-z"), ("2fa", "starting with a letter"), ("n", "2-40"), ("bad-name", "a-z"),
        ("x" * 41, "2-40"), ("class", "reserved"), ("core", "reserved"), ("tests", "reserved"),
        ("users", "already exists"),
    ])
    def test_bad_or_taken_names_are_refused(self, name: str, fragment: str) -> None:
        with pytest.raises(ModuleError, match=fragment):
            check_name(name, ROOT)

    def test_core_provider_names_are_refused(self) -> None:
        with pytest.raises(ModuleError, match="reserved"):
            check_name("cache", ROOT, reserved={"cache", "settings"})

    @pytest.mark.parametrize(("name", "entity"), [
        ("notes", "note"), ("gift_cards", "gift_card"), ("categories", "category"),
        ("address", "address_record"), ("inventory", "inventory_record"),
    ])
    def test_the_entity_is_the_singular(self, name: str, entity: str) -> None:
        assert entity_of(name) == entity

    def test_nothing_is_written_when_the_name_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "modules" / "notes").mkdir(parents=True)
        with pytest.raises(ModuleError, match="already exists"):
            new_module("notes", tmp_path)
        assert not (tmp_path / "tests").exists()


def _copy_project(target: Path) -> None:
    shutil.copytree(ROOT, target, ignore=lambda _dir, names: [n for n in names if n in SKIP])


def _run(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    environment.update({"PYTHONPATH": str(cwd), **env})
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / args[0]) if (bin_dir / args[0]).exists() else args[0], *args[1:]]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def test_a_generated_module_runs_migrates_and_passes_its_tests(tmp_path: Path) -> None:
    project = tmp_path / "project"
    _copy_project(project)

    created = _run(project, "python", "-m", "main", "new-module", "widgets")
    assert created.returncode == 0, created.stderr
    assert "created modules/widgets/router.py" in created.stdout
    assert "## widgets" in (project / "docs" / "modules.md").read_text()  # the docs follow at once
    enabled = {"ATRIUM_MODULES": "users,items,billing,widgets"}

    for check in (("ruff", "check", "modules/widgets", "tests/modules"), ("lint-imports",)):
        result = _run(project, *check)
        assert result.returncode == 0, result.stdout + result.stderr

    database = project / "var" / "widgets.db"
    migrated = _run(project, "python", "-m", "main", "migrate",
                    ATRIUM_DATABASE_URL=f"sqlite+aiosqlite:///{database}", **enabled)
    assert migrated.returncode == 0, migrated.stderr
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT count(*) FROM widgets").fetchone() == (0,)
        versions = {row[0] for row in connection.execute("SELECT version_num FROM alembic_version")}
    assert "widgets_0001" in versions
    described = _run(project, "python", "-m", "main", "modules", **enabled)
    assert "widgets.WidgetCreated -> widgets.announce_created" in described.stdout
    assert "route  POST    /api/v1/widgets" in described.stdout

    verified = _run(project, "python", "-m", "main", "modules", "verify", **enabled)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    tests = _run(project, "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/modules/widgets",
                 "tests/test_architecture.py", "tests/unit/test_module_docs.py", **enabled)
    assert tests.returncode == 0, tests.stdout[-3000:]
    assert "failed" not in tests.stdout
    assert "widgets" in _run(project, "python", "-m", "pytest", "--collect-only", "-q",
                             "tests/modules/widgets", **enabled).stdout
