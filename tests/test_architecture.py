"""The architecture holds: import contracts, and every enabled module is fully registered.

For each module in ``settings.modules``: its routes are served by the app, its tasks are actors on
the container's broker in its own namespace, and its tables are on the shared metadata and in
the migrated database, owned by that module alone. Importing ``main`` builds nothing.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import create_async_engine

import core.edge.idempotency
import core.messaging.outbox
import main
from containers import build_container
from core.db.base import Base
from core.module import Module, import_module, load_modules
from core.observability.logging import configure_logging
from tests.support.db import table_names
from tests.support.settings import make_settings
from tooling.verify import verify

REPO = Path(__file__).resolve().parent.parent
ENABLED = make_settings().modules
CORE_TABLES = {
    core.messaging.outbox.OutboxMessage.__tablename__,
    core.messaging.outbox.InboxMessage.__tablename__,
    core.edge.idempotency.IdempotencyKey.__tablename__,
}


def module_packages() -> list[str]:
    """Every folder under modules/ that is a package (what ATRIUM_MODULES may name)."""
    return sorted(p.parent.name for p in (REPO / "modules").glob("*/__init__.py"))


@pytest.fixture(scope="module")
def loaded() -> list[Module]:
    return load_modules(ENABLED)


# --- import contracts ------------------------------------------------------------------------------


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, dotted name)`` of every absolute import; ``from a.b import c`` of a package gives a.b.c."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.count(".") == 1 and node.module.startswith("modules."):
                for alias in node.names:  # ``from modules.items import public``
                    yield node.lineno, f"{node.module}.{alias.name}"
            else:
                yield node.lineno, node.module


@pytest.mark.parametrize("name", module_packages())
def test_a_module_imports_only_the_public_face_of_another(name: str) -> None:
    offences = []
    for path in sorted((REPO / "modules" / name).rglob("*.py")):
        for lineno, imported in _imports(path):
            parts = imported.split(".")
            if parts[0] != "modules" or len(parts) < 2 or parts[1] == name:
                continue
            if len(parts) >= 3 and parts[2] == "public":
                continue
            offences.append(f"{path.relative_to(REPO)}:{lineno} imports {imported}")

    assert offences == []


@pytest.mark.parametrize("name", module_packages())
def test_no_module_imports_the_root_container_or_main(name: str) -> None:
    offences = [
        f"{path.relative_to(REPO)}:{lineno} imports {imported}"
        for path in sorted((REPO / "modules" / name).rglob("*.py"))
        for lineno, imported in _imports(path)
        if imported.split(".")[0] in {"containers", "main"}
    ]
    assert offences == []


@pytest.mark.parametrize("name", module_packages())
def test_every_module_package_declares_its_module(name: str) -> None:
    module = import_module(name)

    assert module.name == name
    assert (REPO / "modules" / name / "public.py").exists(), "other modules need a public face"


# --- the container -----------------------------------------------------------------------------------


def test_atrium_modules_verify_finds_nothing() -> None:
    """The rules of `atrium modules verify` (cycles, imports, dependencies, actors, tables, container)
    hold for every module package, enabled or not (tests/unit/test_module_verify.py tests each rule)."""
    violations = verify(module_packages(), REPO, build=lambda mods: build_container(make_settings(), mods))

    assert [str(v) for v in violations] == []


def test_the_default_container_has_every_dependency_satisfied() -> None:
    container = build_container(make_settings())

    container.check_dependencies()
    for name in ENABLED:
        assert name in container.providers


# --- routes ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi_paths(loaded: list[Module]) -> dict[str, Any]:
    try:
        app = main.create_app(make_settings())
        return app.openapi()["paths"]
    finally:
        configure_logging(level="WARNING", enqueue=False)


@pytest.mark.parametrize("name", ENABLED)
def test_every_route_of_a_module_is_served_under_api_v1(
    name: str, loaded: list[Module], openapi_paths: dict[str, Any]
) -> None:
    module = next(m for m in loaded if m.name == name)
    if module.router is None:
        pytest.skip(f"module {name!r} has no router")
    declared = {
        (f"{main.API_PREFIX}{route.path}", method.lower())
        for route in module.router.routes
        for method in (getattr(route, "methods", None) or ())
        if getattr(route, "include_in_schema", True) and method != "HEAD"
    }
    served = {(path, method) for path, item in openapi_paths.items() for method in item}

    assert declared, f"module {name!r} has a router without routes"
    assert declared <= served, sorted(declared - served)


def test_the_users_routes_are_the_contracted_ones(openapi_paths: dict[str, Any]) -> None:
    if "users" not in ENABLED:
        pytest.skip("users is not enabled")
    paths = {(p, m) for p, item in openapi_paths.items() for m in item if p.startswith("/api/v1")}

    assert {("/api/v1/users", "post"), ("/api/v1/auth/token", "post"), ("/api/v1/users/me", "get"),
            ("/api/v1/users/{user_id}", "get")} <= paths


# --- jobs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def broker_actors() -> dict[str, Any]:
    container = build_container(make_settings())
    container.jobs()
    broker = container.broker()
    try:
        return dict(broker.actors)
    finally:
        await container.engine().dispose()


def _task_names(module: Module) -> set[str]:
    return {t.name for t in module.tasks} | {t.name for hs in module.subscriptions.values() for t in hs}


@pytest.mark.parametrize("name", ENABLED)
def test_every_task_of_a_module_is_an_actor_on_the_broker(
    name: str, loaded: list[Module], broker_actors: dict[str, Any]
) -> None:
    module = next(m for m in loaded if m.name == name)
    tasks = _task_names(module)

    assert tasks <= set(broker_actors), sorted(tasks - set(broker_actors))
    for task_name in tasks:
        assert task_name.startswith(f"{name}."), task_name
        # one queue per module, behind the deployment's broker namespace
        assert broker_actors[task_name].queue_name == f"{make_settings().broker_namespace}.{name}"


def test_the_broker_has_no_actor_that_no_module_declares(
    loaded: list[Module], broker_actors: dict[str, Any]
) -> None:
    declared = set().union(*(_task_names(m) for m in loaded))

    assert set(broker_actors) == declared


def test_the_users_welcome_email_is_an_actor(broker_actors: dict[str, Any]) -> None:
    if "users" not in ENABLED:
        pytest.skip("users is not enabled")

    assert "users.send_welcome_email" in broker_actors


# --- tables -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def migrated_tables(sqlite_url: str) -> set[str]:
    return await table_names(sqlite_url)


@pytest.mark.parametrize("name", ENABLED)
def test_the_tables_of_a_module_are_registered_and_migrated(
    name: str, loaded: list[Module], migrated_tables: set[str]
) -> None:
    module = next(m for m in loaded if m.name == name)

    for table in module.tables:
        assert table in Base.metadata.tables, f"{table} is not on core.db.session.Base.metadata"
        assert table in migrated_tables, f"{table} is not created by the migrations"


def test_no_table_is_owned_by_two_modules(loaded: list[Module]) -> None:
    owners = Counter(table for module in loaded for table in module.tables)

    assert [table for table, count in owners.items() if count > 1] == []
    assert set(owners).isdisjoint(CORE_TABLES)


def test_the_core_tables_are_migrated(migrated_tables: set[str]) -> None:
    assert {"outbox_messages", "inbox_messages", "alembic_version"} <= migrated_tables


async def test_the_migrations_match_the_models(sqlite_url: str, loaded: list[Module]) -> None:
    """Alembic's autogenerate finds nothing to change: no model change lacks a migration."""
    engine = create_async_engine(sqlite_url)
    try:
        async with engine.connect() as connection:
            diffs = await connection.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
    finally:
        await engine.dispose()
    enabled = {t for m in loaded for t in m.tables} | CORE_TABLES

    assert [d for d in diffs if _tables_of(d) & enabled] == []


def _tables_of(diff: Any) -> set[str]:
    """The table names a diff entry of ``compare_metadata`` is about (entries may be nested lists)."""
    if isinstance(diff, list):
        return set().union(*(_tables_of(d) for d in diff))
    names: set[str] = set()
    for item in diff[1:]:
        if isinstance(item, Table):
            names.add(item.name)
        elif isinstance(getattr(item, "table", None), Table):
            names.add(item.table.name)
        elif isinstance(item, str):
            names.add(item)
    return names


# --- importing main ------------------------------------------------------------------------------------


def test_importing_main_builds_nothing() -> None:
    code = (
        "import main, sys, dramatiq.broker\n"
        "print('modules.users.module' in sys.modules)\n"
        "print(any(m == 'modules' or m.startswith('modules.') for m in sys.modules))\n"
        "print(dramatiq.broker.global_broker is not None)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=env, check=False)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "False"]
