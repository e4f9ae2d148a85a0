"""``tooling.verify``: each rule caught on a deliberately broken module, and the real project clean.

Broken modules are real packages written under ``tmp_path/<package>/`` (a fresh package name per
test, ``tmp_path`` on ``sys.path``) and verified with ``verify(..., package=<package>)``, so
nothing is added to ``modules/`` and no table lands on ``core.db.session.Base``: each throwaway package
has its own declarative base in ``<package>/db.py``.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from containers import build_container
from core.module import load_modules
from tests.support.settings import make_settings
from tooling.verify import Violation, discover, verify

REPO = Path(__file__).resolve().parents[2]

MODULE_PY = """\
from dependency_injector import containers, providers

from core.module import Module
{imports}

{container}

MODULE = Module(
    name={name!r},
    container=Container,
    depends_on={depends_on!r},{kwargs}
)
"""

EMPTY_CONTAINER = """\
class Container(containers.DeclarativeContainer):
    pass
"""

PUBLIC_PY = '''\
"""The public face of {name}."""

from typing import Protocol


class Facade(Protocol):
    def hello(self) -> str:
        """Say hello."""
        ...
'''


class Tree:
    """A throwaway package of modules under ``tmp_path``; ``PKG`` in file text becomes its name."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path
        self.package = f"mut_{uuid.uuid4().hex[:8]}"
        top = tmp_path / self.package
        top.mkdir()
        (top / "__init__.py").write_text("")
        (top / "db.py").write_text(
            "from sqlalchemy.orm import DeclarativeBase\n\n\nclass Base(DeclarativeBase):\n    pass\n"
        )

    def module(
        self,
        name: str,
        *,
        depends_on: Sequence[str] = (),
        container: str = EMPTY_CONTAINER,
        imports: str = "",
        kwargs: str = "",
        files: dict[str, str] | None = None,
    ) -> None:
        folder = self.root / self.package / name
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        (folder / "public.py").write_text(PUBLIC_PY.format(name=name))
        source = MODULE_PY.format(imports=self.fill(imports), container=textwrap.dedent(container).strip(),
                                  name=name, depends_on=tuple(depends_on),
                                  kwargs=f"\n    {self.fill(kwargs)}," if kwargs else "")
        (folder / "module.py").write_text(source)
        for relative, text in (files or {}).items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.fill(textwrap.dedent(text)))
        importlib.invalidate_caches()

    def fill(self, text: str) -> str:
        return text.replace("PKG", self.package)

    def path(self, relative: str) -> str:
        return f"{self.package}/{relative}"

    def verify(self, *names: str, build: bool = True) -> list[Violation]:
        base = importlib.import_module(f"{self.package}.db").Base
        builder = (lambda modules: build_container(make_settings(), modules)) if build else None
        return verify(list(names), self.root, package=self.package, build=builder, base=base)


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tree]:
    monkeypatch.syspath_prepend(str(tmp_path))
    made = Tree(tmp_path)
    yield made
    for key in [k for k in sys.modules if k == made.package or k.startswith(f"{made.package}.")]:
        del sys.modules[key]


def rules(violations: list[Violation]) -> list[str]:
    return [v.rule for v in violations]


def only(violations: list[Violation], rule: str) -> Violation:
    found = [v for v in violations if v.rule == rule]
    assert len(found) == 1, [str(v) for v in violations]
    return found[0]


def line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


# --- the real project --------------------------------------------------------------------------------


def test_the_project_verifies_clean() -> None:
    violations = verify(discover(), REPO, build=lambda modules: build_container(make_settings(), modules))

    assert [str(v) for v in violations] == []


def test_the_project_modules_are_found_under_modules() -> None:
    assert {"users", "items", "billing"} <= set(discover())


def test_a_clean_throwaway_tree_has_no_violation(tree: Tree) -> None:
    tree.module("a", container="""
        class Container(containers.DeclarativeContainer):
            a_facade = providers.Object("hello")
    """)
    tree.module("b", depends_on=["a"], container="""
        class Container(containers.DeclarativeContainer):
            a_facade = providers.Dependency()
    """, files={"service.py": "from PKG.a.public import Facade\nfrom ..a import public\n"})

    assert tree.verify("a", "b") == []


# --- load ---------------------------------------------------------------------------------------------


def test_an_unknown_module_is_a_load_violation(tree: Tree) -> None:
    violation = only(tree.verify("ghost"), "load")

    assert violation.file == tree.path("ghost/module.py")
    assert "module 'ghost' not found" in violation.message


def test_a_module_that_fails_to_import_is_reported_and_the_others_still_checked(tree: Tree) -> None:
    tree.module("a", imports="import no_such_library_anywhere  # noqa")
    tree.module("b", files={"service.py": "from PKG.a.models import X\n"})

    violations = tree.verify("a", "b")

    assert sorted(rules(violations)) == ["import", "load"]
    assert "ModuleNotFoundError" in only(violations, "load").message


def test_a_dependency_that_is_not_enabled_is_a_load_violation(tree: Tree) -> None:
    tree.module("a", depends_on=["elsewhere"])

    violation = only(tree.verify("a"), "load")

    assert violation.file == tree.path("a/module.py")
    assert violation.line == line_of(tree.root / tree.path("a/module.py"), "depends_on")
    assert "depends on 'elsewhere', which is not enabled" in violation.message


# --- cycles -------------------------------------------------------------------------------------------


def test_a_cycle_of_declared_dependencies_is_refused(tree: Tree) -> None:
    tree.module("a", depends_on=["b"], files={"x.py": "from PKG.b.public import Facade\n"})
    tree.module("b", depends_on=["a"], files={"x.py": "from PKG.a.public import Facade\n"})

    violation = only(tree.verify("a", "b"), "cycle")

    assert "a -> b -> a" in violation.message
    assert violation.file == tree.path("a/x.py")  # the import to change, not only the declaration
    assert violation.line == 1


def test_a_cycle_through_an_import_alone_is_refused(tree: Tree) -> None:
    """``b`` never declares ``a``; its import closes the loop all the same."""
    tree.module("a", depends_on=["b"], files={"x.py": "from PKG.b.public import Facade\n"})
    tree.module("b", files={"service.py": '"""b."""\n\nimport PKG.a.public\n'})

    violations = tree.verify("a", "b")

    cycle = only(violations, "cycle")
    assert "a -> b -> a" in cycle.message
    assert f"{tree.path('b/service.py')}:3 `import {tree.package}.a.public`" in cycle.message
    assert "does not declare 'a' in depends_on" in only(violations, "import").message


def test_a_module_depending_on_itself_is_a_cycle(tree: Tree) -> None:
    tree.module("a", depends_on=["a"])

    assert "a -> a" in only(tree.verify("a"), "cycle").message


# --- imports ------------------------------------------------------------------------------------------


def test_importing_a_non_public_file_of_another_module_names_file_line_and_import(tree: Tree) -> None:
    tree.module("a", files={"models.py": "X = 1\n"})
    tree.module("b", depends_on=["a"], files={
        "service.py": '"""b."""\nfrom PKG.a.public import Facade\nfrom PKG.a.models import X\n',
    })

    violation = only(tree.verify("a", "b"), "import")

    assert (violation.file, violation.line) == (tree.path("b/service.py"), 3)
    assert f"`from {tree.package}.a.models import X` reaches into module 'a'" in violation.message
    assert str(violation).startswith(f"{tree.path('b/service.py')}:3: [import] ")


@pytest.mark.parametrize("statement", [
    "import PKG.a.repository",
    "import PKG.a.repository as repo",
    "from PKG.a import repository",
    "from PKG.a import Facade",  # the package __init__ is not the public face either
    "from PKG import a",
    "from ..a import repository",  # relative imports are resolved
    "from ..a.repository import thing",
])
def test_every_form_of_import_of_a_private_file_is_caught(tree: Tree, statement: str) -> None:
    tree.module("a")
    tree.module("b", depends_on=["a"], files={
        "public.py": "from PKG.a.public import Facade\n",
        "sub/deep.py": f"def later():\n    {statement}\n",  # inside a function, in a sub-package
    })
    (tree.root / tree.path("b/sub/__init__.py")).write_text("")
    if statement.startswith("from .."):  # two levels up from b/sub/ is b/: one more reaches the package
        tree_file = tree.root / tree.path("b/sub/deep.py")
        tree_file.write_text(tree_file.read_text().replace("from ..", "from ..."))

    violation = only(tree.verify("a", "b"), "import")

    assert (violation.file, violation.line) == (tree.path("b/sub/deep.py"), 2)


def test_importing_the_public_face_of_an_undeclared_module_is_refused(tree: Tree) -> None:
    tree.module("a")
    tree.module("b", files={"tasks.py": "from PKG.a.public import Facade\n"})

    violation = only(tree.verify("a", "b"), "import")

    assert violation.file == tree.path("b/tasks.py")
    assert f"imports {tree.package}.a.public, but 'b' does not declare 'a' in depends_on" in violation.message


def test_relative_imports_inside_the_module_are_its_own_business(tree: Tree) -> None:
    tree.module("a", files={"service.py": "from . import public\nfrom .public import Facade\n"})

    assert tree.verify("a") == []


# --- unused dependencies ------------------------------------------------------------------------------


def test_a_declared_dependency_that_is_never_used_is_refused(tree: Tree) -> None:
    tree.module("a")
    tree.module("b", depends_on=["a"])

    violation = only(tree.verify("a", "b"), "unused")

    assert violation.file == tree.path("b/module.py")
    assert violation.line == line_of(tree.root / tree.path("b/module.py"), "depends_on")
    assert "declares 'a' in depends_on but never uses it" in violation.message


def test_a_dependency_used_only_through_a_wired_provider_counts_as_used(tree: Tree) -> None:
    tree.module("a", container="""
        class Container(containers.DeclarativeContainer):
            a_facade = providers.Object("hello")
    """)
    tree.module("b", depends_on=["a"], container="""
        class Container(containers.DeclarativeContainer):
            a_facade = providers.Dependency()
            outbox = providers.Dependency()  # from core, not from a
    """)

    assert tree.verify("a", "b") == []


def test_a_provider_core_offers_does_not_make_a_dependency_used(tree: Tree) -> None:
    """``outbox`` comes from core even when ``a`` also has one: ``a`` is still unused."""
    tree.module("a", container="""
        class Container(containers.DeclarativeContainer):
            outbox = providers.Object("a's own")
    """)
    tree.module("b", depends_on=["a"], container="""
        class Container(containers.DeclarativeContainer):
            outbox = providers.Dependency()
    """)

    assert rules(tree.verify("a", "b")) == ["unused"]


# --- actors -------------------------------------------------------------------------------------------

TASKS = '''\
from core.messaging.queue import JobContext, task


@task("{name}")
async def run(ctx: JobContext, payload: dict) -> None:
    """Run."""
'''


def test_an_actor_outside_its_module_namespace_is_refused(tree: Tree) -> None:
    tree.module("a", imports="from PKG.a.tasks import run", kwargs="tasks=(run,)",
                files={"tasks.py": TASKS.format(name="other.run")})

    violation = only(tree.verify("a"), "actor")

    assert (violation.file, violation.line) == (tree.path("a/tasks.py"), 4)
    assert "actor 'other.run' of module 'a' must be named 'a.<verb>'" in violation.message


def test_an_actor_name_that_is_not_module_dot_verb_is_refused(tree: Tree) -> None:
    tree.module("a", imports="from typing import Any\nfrom pydantic import TypeAdapter\n"
                             "from core.messaging.queue import Task\nfrom PKG.a.tasks import run",
                kwargs='tasks=(Task("a.Run-Now", run.fn, TypeAdapter(Any)),)',
                files={"tasks.py": TASKS.format(name="a.run")})

    assert "'a.Run-Now'" in only(tree.verify("a"), "actor").message


def test_an_actor_name_used_by_two_modules_is_refused(tree: Tree) -> None:
    tree.module("a", imports="from PKG.a.tasks import run", kwargs="tasks=(run,)",
                files={"tasks.py": TASKS.format(name="a.run")})
    tree.module("b", imports="from PKG.b.tasks import run", kwargs="tasks=(run,)",
                files={"tasks.py": TASKS.format(name="a.run")})  # copied and not renamed

    violations = [v for v in tree.verify("a", "b") if v.rule == "actor"]

    assert len(violations) == 2  # b's is outside its namespace, and the name is taken twice
    duplicate = next(v for v in violations if "declared 2 times" in v.message)
    assert tree.path("a/tasks.py") in duplicate.message
    assert tree.path("b/tasks.py") in duplicate.message


def test_a_task_and_a_handler_with_one_name_but_two_functions_are_refused(tree: Tree) -> None:
    tree.module("a", imports="from PKG.a.tasks import run\nfrom PKG.a.more import run as again\n"
                             "from PKG.a.events import Happened",
                kwargs="tasks=(run,), subscriptions={Happened: (again,)}",
                files={"tasks.py": TASKS.format(name="a.run"), "more.py": TASKS.format(name="a.run"),
                       "events.py": "from core.messaging.events import IntegrationEvent\n\n\n"
                                    "class Happened(IntegrationEvent):\n    name = 'a.Happened'\n"})

    assert "actor name 'a.run' is declared 2 times" in only(tree.verify("a"), "actor").message


def test_one_task_listed_as_task_and_handler_is_one_actor(tree: Tree) -> None:
    tree.module("a", imports="from PKG.a.tasks import run\nfrom PKG.a.events import Happened",
                kwargs="tasks=(run,), subscriptions={Happened: (run,)}",
                files={"tasks.py": TASKS.format(name="a.run"),
                       "events.py": "from core.messaging.events import IntegrationEvent\n\n\n"
                                    "class Happened(IntegrationEvent):\n    name = 'a.Happened'\n"})

    assert tree.verify("a") == []


# --- tables -------------------------------------------------------------------------------------------

MODELS = """\
from sqlalchemy.orm import Mapped, mapped_column

from PKG.db import Base


class Widget(Base):
    __tablename__ = "widgets"

    id: Mapped[int] = mapped_column(primary_key=True)
"""


def test_a_table_declared_by_two_modules_is_refused(tree: Tree) -> None:
    tree.module("a", imports="from PKG.a.models import Widget", kwargs="models=(Widget,)",
                files={"models.py": MODELS})
    tree.module("b", depends_on=["a"], imports="from PKG.a.models import Widget", kwargs="models=(Widget,)",
                files={"x.py": "from PKG.a.public import Facade\n"})

    violations = [v for v in tree.verify("a", "b") if v.rule == "table"]
    messages = " | ".join(v.message for v in violations)

    assert "table 'widgets' is declared by 2 modules: a, b" in messages
    assert f"module 'b' declares table 'widgets', but its model Widget is defined in {tree.package}.a" \
        in messages
    # b's module.py imports a's models: that is reported too, by the import rule
    assert only(tree.verify("a", "b"), "import").file == tree.path("b/module.py")


def test_a_table_no_module_declares_is_refused(tree: Tree) -> None:
    tree.module("a", files={"models.py": MODELS})  # defined, but not in MODULE.models
    importlib.import_module(f"{tree.package}.a.models")

    violation = only(tree.verify("a"), "table")

    assert (violation.file, violation.line) == (tree.path("a/models.py"), 6)
    assert "table 'widgets'" in violation.message
    assert "belongs to no module" in violation.message
    assert "add Widget to MODULE.models of 'a'" in violation.message


def test_a_table_defined_outside_any_module_is_refused(tree: Tree) -> None:
    (tree.root / tree.path("stray.py")).write_text(tree.fill(MODELS))
    importlib.import_module(f"{tree.package}.stray")
    tree.module("a")

    violation = only(tree.verify("a"), "table")

    assert violation.file == tree.path("stray.py")
    assert f"table 'widgets' ({tree.package}.stray) belongs to no module" in violation.message


def test_a_module_cannot_claim_a_core_table(tree: Tree) -> None:
    """On the real ``core.db.session.Base``: core's tables are the models defined under core/."""
    tree.module("a", imports="from core.messaging.outbox import OutboxMessage",
                kwargs="models=(OutboxMessage,)")

    violations = verify(["a"], tree.root, package=tree.package)

    messages = [v.message for v in violations if v.rule == "table"]
    assert any("table 'outbox_messages' is core's (core.messaging.outbox), but module 'a' declares it" in m
               for m in messages), messages


# --- the container ------------------------------------------------------------------------------------


def test_a_dependency_nobody_provides_names_the_module_and_the_provider(tree: Tree) -> None:
    tree.module("a", container="""
        class Container(containers.DeclarativeContainer):
            outbox = providers.Dependency()
            not_a_core_provider = providers.Dependency()
            another_missing = providers.Dependency()
    """)
    module_py = tree.root / tree.path("a/module.py")

    violations = [v for v in tree.verify("a") if v.rule == "container"]

    assert [(v.file, v.line) for v in violations] == [
        (tree.path("a/module.py"), line_of(module_py, "not_a_core_provider")),
        (tree.path("a/module.py"), line_of(module_py, "another_missing")),
    ]
    assert "module 'a' needs provider 'not_a_core_provider'" in violations[0].message


def test_a_provider_of_a_module_not_in_depends_on_is_not_wired(tree: Tree) -> None:
    tree.module("a", container="""
        class Container(containers.DeclarativeContainer):
            a_facade = providers.Object("hello")
    """)
    tree.module("b", container="""
        class Container(containers.DeclarativeContainer):
            a_facade = providers.Dependency()
    """)

    violation = only(tree.verify("a", "b"), "container")

    assert "module 'b' needs provider 'a_facade'" in violation.message
    assert "dependencies (none)" in violation.message


def test_what_only_build_container_refuses_is_reported_too(tree: Tree) -> None:
    """A module named like a core provider: the name check passes, ``build_container`` refuses."""
    tree.module("cache")

    violation = only(tree.verify("cache"), "container")

    assert "collides with the core provider" in violation.message


def test_without_a_builder_the_container_rule_is_skipped(tree: Tree) -> None:
    tree.module("a", container="""
        class Container(containers.DeclarativeContainer):
            not_a_core_provider = providers.Dependency()
    """)

    assert tree.verify("a", build=False) == []


# --- output -------------------------------------------------------------------------------------------


def test_violations_are_sorted_one_line_each(tree: Tree) -> None:
    tree.module("a", files={"models.py": "X = 1\n"})
    tree.module("b", files={"z.py": "from PKG.a.models import X\n", "y.py": "from PKG.a.models import X\n"})

    violations = tree.verify("a", "b")

    assert violations == sorted(violations)
    assert all("\n" not in str(v) for v in violations)
    assert [v.file for v in violations] == [tree.path("b/y.py"), tree.path("b/z.py")]


def test_the_real_modules_load_in_dependency_order_for_the_container_rule() -> None:
    names = [m.name for m in load_modules(["billing", "users", "items"])]

    assert names.index("billing") > names.index("users")
    assert verify(["billing", "users", "items"], REPO,
                  build=lambda modules: build_container(make_settings(), modules)) == []

