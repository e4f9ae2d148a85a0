"""Tests share helpers through ``tests/support`` only: no test module imports another test module
or a conftest (a conftest holds fixtures, which pytest hands out by name, not by import)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    last = dotted.rsplit(".", 1)[-1]
    return last == "conftest" or last.startswith("test_")


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(TESTS.parent) if TESTS.parent in path.parents else path
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module.split(".")[0] != "tests":
                continue
            if _is_test_module(module) or any(_is_test_module(alias.name) for alias in node.names):
                found.append(f"{where}:{node.lineno}: from {'.' * node.level}{module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.startswith("tests.") and _is_test_module(alias.name)]
    return found


def test_no_test_module_imports_another_test_module_or_a_conftest() -> None:
    violations = [v for path in sorted(TESTS.rglob("*.py")) for v in _violations(path)]
    assert violations == [], (
        "move shared helpers to tests/support and import them from there:\n" + "\n".join(violations)
    )


def test_the_check_sees_such_imports(tmp_path: Path) -> None:
    sample = tmp_path / "probe.py"
    sample.write_text(
        "from tests.conftest import make_settings\n"
        "from tests.api.test_users_api import assert_envelope\n"
        "from tests.api import conftest\n"
        "from .conftest import something\n"
        "import tests.unit.test_routes\n"
        "from tests.support.settings import make_settings\n"
        "from pytest import fixture\n"
    )
    assert len(_violations(sample)) == 5
