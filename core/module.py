"""The module contract and the registry that turns ``ATRIUM_MODULES`` into an ordered list.

A module is a package ``modules.<name>`` whose ``module.py`` exposes ``MODULE = Module(...)``.
Everything that is built from modules (container, app, worker, migrations) takes the list from
``load_modules`` so they always agree, in dependency order.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dependency_injector import containers
from fastapi import APIRouter

from core.messaging.events import IntegrationEvent
from core.messaging.periodic import Periodic
from core.messaging.queue import Task


class ModuleError(RuntimeError):
    """A module list that cannot be started; the message names the module and what is wrong."""


@dataclass(frozen=True)
class Module:
    name: str
    container: type[containers.DeclarativeContainer]
    router: APIRouter | None = None
    tasks: Sequence[Task] = ()
    models: Sequence[type[Any]] = ()
    depends_on: Sequence[str] = ()
    subscriptions: Mapping[type[IntegrationEvent], Sequence[Task]] = field(default_factory=dict)
    # Housekeeping each worker runs every few seconds (core.messaging.periodic), e.g. a reconciler.
    periodic: Sequence[Periodic] = ()

    @property
    def tables(self) -> list[str]:
        return [model.__tablename__ for model in self.models]

    def routes(self) -> dict[str, list[str]]:
        """Event name -> the task names this module runs for it."""
        return {event.name: [t.name for t in handlers] for event, handlers in self.subscriptions.items()}

    @property
    def actors(self) -> list[str]:
        """Names of its tasks and event handlers, each once, in declaration order."""
        names = [t.name for t in self.tasks] + [t.name for hs in self.subscriptions.values() for t in hs]
        return list(dict.fromkeys(names))


def import_module(name: str, package: str = "modules") -> Module:
    """``<package>.<name>.module:MODULE`` (``package`` is a parameter for tests and ``verify``)."""
    if not name.isidentifier():
        raise ModuleError(f"module name {name!r} is not a valid Python identifier")
    folder = f"{package.replace('.', '/')}/{name}"
    try:
        loaded = importlib.import_module(f"{package}.{name}.module")
    except ModuleNotFoundError as exc:
        if exc.name in (f"{package}.{name}", f"{package}.{name}.module"):
            raise ModuleError(f"module {name!r} not found: expected {folder}/module.py") from None
        raise
    module = getattr(loaded, "MODULE", None)
    if not isinstance(module, Module):
        raise ModuleError(f"{folder}/module.py must define MODULE = Module(...)")
    if module.name != name:
        raise ModuleError(f"{folder}/module.py declares name {module.name!r}; expected {name!r}")
    return module


def select_modules(modules: Sequence[Module], names: Sequence[str], setting: str) -> list[Module]:
    """The loaded modules named in ``names`` (all of them when empty), in load order.

    ``setting`` names where the list came from (``ATRIUM_WORKER_MODULES``) for the error message.
    """
    loaded = [m.name for m in modules]
    for name in names:
        if name not in loaded:
            raise ModuleError(f"{setting}: module {name!r} is not enabled "
                              f"(ATRIUM_MODULES={','.join(loaded)})")
    return [m for m in modules if not names or m.name in names]


def load_modules(names: Sequence[str], package: str = "modules") -> list[Module]:
    """Import the enabled modules and order them so each comes after what it depends on."""
    if len(set(names)) != len(names):
        raise ModuleError(f"a module is listed twice in ATRIUM_MODULES={','.join(names)}")
    found = {name: import_module(name, package) for name in names}
    for module in found.values():
        for dep in module.depends_on:
            if dep not in found:
                raise ModuleError(
                    f"module {module.name!r} depends on {dep!r}, which is not enabled "
                    f"(ATRIUM_MODULES={','.join(names)})"
                )
        declared: list[Task | Periodic] = [*module.tasks, *module.periodic]
        declared += [h for hs in module.subscriptions.values() for h in hs]
        for t in declared:
            if t.module != module.name:
                raise ModuleError(f"module {module.name!r} declares task {t.name!r} outside its namespace")
    ordered: list[Module] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise ModuleError(f"modules depend on each other in a cycle: {' -> '.join((*path, name))}")
        state[name] = "visiting"
        for dep in found[name].depends_on:
            visit(dep, (*path, name))
        state[name] = "done"
        ordered.append(found[name])

    for name in names:
        visit(name, ())
    return ordered
