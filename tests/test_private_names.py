"""Private names of the libraries under Atrium are used in ``core/fastpath/`` and nowhere else.

A private name is an underscored module, function, class or attribute of a library
(``fastapi._compat``, ``_update_scope``, ``adapter._connection``) or of its internal packages
(``sqlalchemy.util``). Outside the fast path, the code base holds to public API, so the stock path
keeps working when a library renames its internals (core/fastpath/README.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("fastapi", "starlette", "sqlalchemy", "redis", "asyncpg", "prometheus_client", "hiredis")
INTERNAL = ("sqlalchemy.util",)  # packages the libraries document as internal


def _sources() -> list[Path]:
    found = [ROOT / "main.py", ROOT / "containers.py"]
    for folder in ("core", "modules", "config", "tooling", "migrations"):
        found += sorted((ROOT / folder).rglob("*.py"))
    fastpath = ROOT / "core" / "fastpath"
    return [p for p in found if fastpath not in p.parents or p.name == "__init__.py"]


def _private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT) if ROOT in path.parents else path
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in LIBRARIES:
                continue
            if _private(node.module) or node.module.startswith(INTERNAL):
                found.append(f"{where}:{node.lineno}: from {node.module} import ...")
            found += [f"{where}:{node.lineno}: {node.module}.{alias.name}"
                      for alias in node.names if _private(alias.name)]
        elif isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: import {alias.name}" for alias in node.names
                      if alias.name.split(".")[0] in LIBRARIES
                      and (_private(alias.name) or alias.name.startswith(INTERNAL))]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            found.append(f"{where}:{node.lineno}: .{node.attr}")
    return found


def test_no_private_library_name_outside_the_fast_path() -> None:
    violations = [v for path in _sources() for v in _violations(path)]
    assert violations == [], "private names outside core/fastpath:\n" + "\n".join(violations)


def test_the_check_sees_a_private_name(tmp_path: Path) -> None:
    sample = tmp_path / "probe.py"
    sample.write_text("from fastapi.routing import _update_scope\nfrom sqlalchemy.util import await_\n"
                      "def f(adapter):\n    return adapter._connection\n")
    assert len(_violations(sample)) == 3
