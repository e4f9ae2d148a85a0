"""``atrium new-module NAME``: a working module folder and its tests, in the house style.

The generated module has every role file (module, public, domain, schemas, models, repository,
service, router, tasks, container), its own Alembic history, and tests. After adding NAME to
``ATRIUM_MODULES`` the app serves its routes, the worker runs its actor, ``atrium migrate``
creates its table, and the boundary checks pass: nothing else in the project is edited.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path
from string import Template

from core.module import ModuleError

TEMPLATES = Path(__file__).resolve().parent / "templates"
NAME = re.compile(r"^[a-z][a-z0-9_]{1,39}$")
# Names that would shadow a package or a top-level module of the project.
RESERVED = frozenset({"core", "config", "modules", "migrations", "tests", "main", "containers", "test"})


def _camel(snake: str) -> str:
    return "".join(part.capitalize() for part in snake.split("_") if part)


def entity_of(name: str) -> str:
    """The singular the generated code uses for one record: ``notes`` -> ``note``."""
    if name.endswith("ies") and len(name) > 4:
        return name[:-3] + "y"
    if name.endswith("s") and not name.endswith("ss") and len(name) > 2:
        return name[:-1]
    return f"{name}_record"


def check_name(name: str, root: Path, reserved: Collection[str] = ()) -> None:
    """Refuse names that cannot be a module, or that are taken; the message says why."""
    if not NAME.match(name):
        raise ModuleError(f"module name {name!r} must be 2-40 characters of a-z, 0-9 and _, "
                          "starting with a letter")
    if keyword.iskeyword(name) or name in RESERVED or name in reserved:
        raise ModuleError(f"module name {name!r} is reserved; choose another")
    for taken in (root / "modules" / name, root / "tests" / "modules" / name):
        if taken.exists():
            raise ModuleError(f"{taken.relative_to(root)} already exists; choose another name")


def new_module(name: str, root: Path, *, entity: str | None = None,
               reserved: Collection[str] = ()) -> list[Path]:
    """Write ``modules/<name>`` and ``tests/modules/<name>``; returns the files created."""
    check_name(name, root, reserved)
    entity = entity or entity_of(name)
    if not NAME.match(entity) or keyword.iskeyword(entity):
        raise ModuleError(f"entity name {entity!r} must be snake_case (e.g. note)")
    values = {
        "name": name, "Name": _camel(name), "table": name, "entity": entity, "Entity": _camel(entity),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
    plan: dict[Path, Path] = {}
    for template in sorted((TEMPLATES / "module").rglob("*.tmpl")):
        relative = template.relative_to(TEMPLATES / "module")
        target = root / "modules" / name / relative.with_suffix("")
        if relative.parts[0] == "migrations":
            target = target.with_name(f"{name}_0001_{name}.py")
        plan[target] = template
    for template in sorted((TEMPLATES / "tests").glob("*.tmpl")):
        stem = template.name.removesuffix(".py.tmpl")
        plan[root / "tests" / "modules" / name / f"test_{name}_{stem.removeprefix('test_')}.py"] = template
    created: list[Path] = []
    tests = root / "tests" / "modules"
    for init in (tests / "__init__.py", tests / name / "__init__.py"):
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text("")
            created.append(init)
    for target, template in plan.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(Template(template.read_text()).substitute(values))
        created.append(target)
    return created
