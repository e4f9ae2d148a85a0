"""``atrium modules verify``: the module rules, checked on the code and the declarations.

``verify(names)`` imports each module by name (``<package>.<name>.module:MODULE``, as
``core.module`` does: ``core`` imports no module statically) and returns one ``Violation`` per
broken rule, each naming the file (and line) at fault:

- ``load``       the module imports, declares ``MODULE`` and everything in its ``depends_on`` is there;
- ``cycle``      no cycle between modules, through ``depends_on`` or through actual imports;
- ``import``     of another module, only ``<package>.<other>.public``, and only of a module in
                 ``depends_on`` (every ``import`` / ``from ... import`` of every file, relative
                 imports resolved, found with ``ast``);
- ``unused``     every module in ``depends_on`` is used: an import of its public face, or a
                 ``providers.Dependency`` of the container wired from its providers;
- ``actor``      task and event handler names are ``<module>.<verb>`` of their module, unique;
- ``table``      each table of ``Module.models`` belongs to exactly one module, and every table on
                 the metadata to an enabled module or to core (core's are the models under ``core/``);
- ``container``  every ``providers.Dependency`` of a module container is filled: checked by name and
                 then by ``build`` (``containers.build_container``, which ends in ``check_dependencies()``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import itertools
import pkgutil
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dependency_injector import providers

from core.messaging.queue import TASK_NAME, Task
from core.module import Module, ModuleError, import_module

RULES = ("load", "cycle", "import", "unused", "actor", "table", "container")

Build = Callable[[Sequence[Module]], Any]


@dataclass(frozen=True, order=True)
class Violation:
    file: str  # relative to the verified root when inside it
    line: int  # 0 when the rule is about a whole file
    rule: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: [{self.rule}] {self.message}"


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    target: str  # the dotted name imported; ``from a.b import c`` gives ``a.b.c``
    statement: str


def discover(package: str = "modules") -> list[str]:
    """Every sub-package of ``package`` (what ``ATRIUM_MODULES`` may name), sorted."""
    found: set[str] = set()
    for location in getattr(importlib.import_module(package), "__path__", []):
        for child in Path(location).iterdir():
            if child.name.isidentifier() and (child / "__init__.py").is_file():
                found.add(child.name)
    return sorted(found)


def verify(
    names: Sequence[str] | None = None,
    root: Path | None = None,
    *,
    package: str = "modules",
    build: Build | None = None,
    base: Any = None,
) -> list[Violation]:
    """Check the rules on the modules ``names`` (default: every package under ``package``).

    ``build(modules)`` builds the root container for already-loaded modules (or raises); without
    it the ``container`` rule is skipped. ``base`` is the declarative base whose metadata holds
    the tables (default ``core.db.session.Base``).
    """
    return _Verifier(list(discover(package) if names is None else names), Path(root or Path.cwd()),
                     package, build, base).run()


class _Verifier:
    def __init__(self, names: list[str], root: Path, package: str, build: Build | None, base: Any) -> None:
        self.names = names
        self.root = root.resolve()
        self.package = package
        self.prefix = package.split(".")
        self.build = build
        self.base = base
        self.out: list[Violation] = []
        self.loaded: dict[str, Module] = {}
        self.imports: dict[str, list[Import]] = {}
        self.core_names: set[str] | None = None
        self.packages = set(discover(package)) | set(names)  # a file such as <package>/db.py is no module

    # --- plumbing ----------------------------------------------------------------------------------

    def fail(self, path: Path | str, line: int, rule: str, message: str) -> None:
        self.out.append(Violation(self.show(path), line, rule, message))

    def show(self, path: Path | str) -> str:
        path = Path(path)
        if not path.is_absolute():
            return path.as_posix()
        try:
            return path.resolve().relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def folder(self, name: str) -> Path:
        spec = importlib.util.find_spec(f"{self.package}.{name}")
        if spec is not None and spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        return self.root.joinpath(*self.prefix, name)

    def module_py(self, name: str) -> Path:
        return self.folder(name) / "module.py"

    def owner(self, dotted: str) -> str | None:
        """The module a dotted name belongs to (``modules.items.public`` -> ``items``), if any."""
        parts = dotted.split(".")
        n = len(self.prefix)
        if len(parts) > n and parts[:n] == self.prefix and parts[n] in self.packages:
            return parts[n]
        return None

    # --- the run -----------------------------------------------------------------------------------

    def run(self) -> list[Violation]:
        self.load()
        for name in self.loaded:
            self.imports[name] = list(_imports(self.folder(name), [*self.prefix, name]))
        if self.build is not None:
            self.core_names = self.core_providers()
        self.check_cycles()
        self.check_imports()
        self.check_unused()
        self.check_actors()
        self.check_tables()
        if self.build is not None and self.core_names is not None:
            self.check_container()
        return sorted(set(self.out))

    def load(self) -> None:
        seen: set[str] = set()
        for name in self.names:
            if name in seen:
                self.fail(self.module_py(name), 0, "load", f"module {name!r} is listed twice")
                continue
            seen.add(name)
            try:
                self.loaded[name] = import_module(name, self.package)
            except ModuleError as exc:
                self.fail(self.module_py(name), 0, "load", str(exc))
            except Exception as exc:  # a module that cannot even be imported: say why, check the rest
                self.fail(self.module_py(name), 0, "load",
                          f"importing {self.package}.{name}.module failed: {type(exc).__name__}: {exc}")
        for name, module in self.loaded.items():
            for dep in module.depends_on:
                if dep not in self.names:
                    self.fail(self.module_py(name), _keyword_line(self.module_py(name), "depends_on"), "load",
                              f"module {name!r} depends on {dep!r}, which is not enabled "
                              f"(verified: {','.join(self.names)})")

    # --- cycles ------------------------------------------------------------------------------------

    def check_cycles(self) -> None:
        edges: dict[str, dict[str, tuple[Path, int, str]]] = {name: {} for name in self.loaded}
        for name, module in self.loaded.items():
            path = self.module_py(name)
            for dep in module.depends_on:
                edges[name].setdefault(dep, (path, _keyword_line(path, "depends_on"), "depends_on"))
        for name, found in self.imports.items():
            for imp in found:
                other = self.owner(imp.target)
                if other is None or other == name:
                    continue
                known = edges[name].get(other)
                if known is None or known[2] == "depends_on":  # an import is the line to change
                    edges[name][other] = (imp.path, imp.line, f"`{imp.statement}`")
        graph = {a: sorted(bs) for a, bs in edges.items()}
        for component in _strongly_connected(graph):
            start = min(component)
            if len(component) == 1 and start not in graph.get(start, ()):
                continue
            cycle = _shortest_cycle(graph, start, component)
            hops = list(itertools.pairwise(cycle))
            evidence = [(a, b, *edges[a][b]) for a, b in hops]
            why = "; ".join(f"{a} -> {b}: {self.show(p)}{f':{ln}' if ln else ''} {what}"
                            for a, b, p, ln, what in evidence)
            # Blame the line to change: an import of an undeclared module, else any import.
            imports = [e for e in evidence if e[4] != "depends_on"]
            undeclared = [e for e in imports if e[1] not in self.loaded[e[0]].depends_on]
            blamed = (undeclared or imports or evidence)[0]
            self.fail(blamed[2], blamed[3], "cycle",
                      f"modules depend on each other in a cycle: {' -> '.join(cycle)} ({why})")

    # --- imports -----------------------------------------------------------------------------------

    def check_imports(self) -> None:
        for name, found in self.imports.items():
            declared = set(self.loaded[name].depends_on)
            for imp in found:
                if imp.target == "<syntax error>":
                    self.fail(imp.path, imp.line, "import", f"cannot be parsed: {imp.statement}")
                    continue
                other = self.owner(imp.target)
                if other is None or other == name:
                    continue
                rest = imp.target.split(".")[len(self.prefix) + 1:]
                public = f"{self.package}.{other}.public"
                if rest[:1] != ["public"]:
                    self.fail(imp.path, imp.line, "import", f"`{imp.statement}` reaches into module "
                                                            f"{other!r}: only {public} may be imported")
                elif other not in declared:
                    self.fail(imp.path, imp.line, "import",
                              f"`{imp.statement}` imports {public}, but {name!r} does not declare "
                              f"{other!r} in depends_on")

    # --- unused dependencies -----------------------------------------------------------------------

    def check_unused(self) -> None:
        for name, module in self.loaded.items():
            imported = {self.owner(imp.target) for imp in self.imports[name]}
            wired = self.wired_from(module)
            path = self.module_py(name)
            for dep in module.depends_on:
                if dep in imported or dep in wired or dep not in self.loaded:
                    continue
                self.fail(path, _keyword_line(path, "depends_on"), "unused",
                          f"module {name!r} declares {dep!r} in depends_on but never uses it (no import of "
                          f"{self.package}.{dep}.public, no provider wired from it)")

    def wired_from(self, module: Module) -> set[str]:
        """The modules of ``depends_on`` that fill one of ``module``'s ``providers.Dependency``."""
        used: set[str] = set()
        for provider_name, provider in module.container.providers.items():
            if not isinstance(provider, providers.Dependency):
                continue
            if self.core_names is not None and provider_name in self.core_names:
                continue
            for dep in module.depends_on:
                other = self.loaded.get(dep)
                exported = other.container.providers.get(provider_name) if other else None
                if exported is not None and (self.core_names is not None
                                             or not isinstance(exported, providers.Dependency)):
                    used.add(dep)
                    break  # build_container takes the first module that has it
        return used

    # --- actors ------------------------------------------------------------------------------------

    def check_actors(self) -> None:
        declared: dict[str, list[tuple[str, Task]]] = {}
        for name, module in self.loaded.items():
            handlers = [t for hs in module.subscriptions.values() for t in hs]
            for t in dict.fromkeys([*module.tasks, *handlers]):  # the same task may be listed twice
                path, line = _source_of(t.fn, self.module_py(name))
                if not TASK_NAME.match(t.name) or t.module != name:
                    self.fail(path, line, "actor", f"actor {t.name!r} of module {name!r} must be named "
                                                   f"'{name}.<verb>' (snake_case)")
                if not any(other is t for _, other in declared.get(t.name, [])):
                    declared.setdefault(t.name, []).append((name, t))
        for task_name, owners in declared.items():
            if len(owners) < 2:
                continue
            where = ", ".join(f"{m} ({self.show(_source_of(t.fn, self.module_py(m))[0])})" for m, t in owners)
            path, line = _source_of(owners[-1][1].fn, self.module_py(owners[-1][0]))
            self.fail(path, line, "actor",
                      f"actor name {task_name!r} is declared {len(owners)} times: {where}")

    # --- tables ------------------------------------------------------------------------------------

    def check_tables(self) -> None:
        base = self.base
        if base is None:
            from core.db.base import Base

            _import_core_models()
            base = Base
        owners: dict[str, list[str]] = {}
        for name, module in self.loaded.items():
            for model in module.models:
                table = getattr(model, "__tablename__", None)
                path, line = _source_of(model, self.module_py(name))
                if table is None:
                    self.fail(path, line, "table",
                              f"{model!r} in MODULE.models of {name!r} is not a mapped class")
                    continue
                owners.setdefault(table, []).append(name)
                defined_in = self.owner(model.__module__)
                if defined_in != name:
                    self.fail(path, line, "table", f"module {name!r} declares table {table!r}, but its model "
                                                   f"{model.__name__} is defined in {model.__module__}")
                if table not in {t.name for t in base.metadata.tables.values()}:
                    self.fail(path, line, "table", f"table {table!r} of module {name!r} is not on the "
                                                   f"metadata of {base.__module__}.{base.__name__}")
        for table, names in sorted(owners.items()):
            if len(names) > 1:
                last = self.module_py(names[-1])
                self.fail(last, _keyword_line(last, "models"), "table",
                          f"table {table!r} is declared by {len(names)} modules: {', '.join(names)} "
                          "(a table belongs to exactly one module)")
        classes = {m.local_table.name: m.class_ for m in base.registry.mappers}
        for table in sorted(t.name for t in base.metadata.tables.values()):
            cls = classes.get(table)
            where = cls.__module__ if cls is not None else "?"
            path, line = _source_of(cls, Path(where.replace(".", "/") + ".py")) if cls else (
                Path(f"{base.__module__.replace('.', '/')}.py"), 0)
            if where == "core" or where.startswith("core."):
                if table in owners:
                    self.fail(self.module_py(owners[table][0]), _keyword_line(
                        self.module_py(owners[table][0]), "models"), "table",
                        f"table {table!r} is core's ({where}), but module {owners[table][0]!r} declares it")
                continue
            if table in owners:
                continue
            defined_in = self.owner(where)
            if defined_in is not None and defined_in not in self.loaded:
                continue  # a module that is not verified here (not enabled in this process)
            hint = f"add {cls.__name__} to MODULE.models of {defined_in!r}" if defined_in and cls else (
                "define it in a module's models.py and list it in MODULE.models")
            self.fail(path, line, "table",
                      f"table {table!r} ({where}) belongs to no module and is not a core table: {hint}")

    # --- the container -----------------------------------------------------------------------------

    def core_providers(self) -> set[str] | None:
        assert self.build is not None
        try:
            root = self.build([])
        except Exception as exc:
            self.fail("containers.py", 0, "container", f"the core container does not build: {exc}")
            return None
        return {n for n, p in root.providers.items() if not isinstance(p, providers.Container)}

    def check_container(self) -> None:
        assert self.build is not None
        assert self.core_names is not None
        built: dict[str, Module] = {}
        for module in _dependency_order(self.loaded):
            if any(dep not in built for dep in module.depends_on):
                continue  # a dependency that failed is reported on its own
            missing = False
            for provider_name, provider in module.container.providers.items():
                if not isinstance(provider, providers.Dependency) or provider_name in self.core_names:
                    continue
                if any(provider_name in built[dep].container.providers for dep in module.depends_on):
                    continue
                missing = True
                path, line = _attribute_line(module.container, provider_name, self.module_py(module.name))
                self.fail(path, line, "container",
                          f"module {module.name!r} needs provider {provider_name!r}, which neither core nor "
                          f"its dependencies ({', '.join(module.depends_on) or 'none'}) provide")
            if missing:
                continue
            try:  # what the name check cannot see: build_container's own refusals, check_dependencies()
                self.build([*built.values(), module])
            except Exception as exc:
                path, line = _source_of(module.container, self.module_py(module.name))
                self.fail(path, line, "container", f"module {module.name!r}: {exc}")
                continue
            built[module.name] = module


# --- helpers ---------------------------------------------------------------------------------------


def _imports(folder: Path, dotted: list[str]) -> Iterator[Import]:
    """Every import of every ``.py`` file under ``folder`` (the package ``dotted``), resolved."""
    for path in sorted(folder.rglob("*.py")):
        parts = [*dotted, *path.relative_to(folder).with_suffix("").parts]
        here = parts[:-1]  # the package a relative import starts from (``__init__`` is its own)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:
            yield Import(path, exc.lineno or 0, "<syntax error>", str(exc))
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(path, node.lineno, alias.name, ast.unparse(node))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    if node.level > len(here):
                        continue  # beyond the top-level package: Python refuses it anyway
                    start = here[: len(here) - (node.level - 1)]
                    base = ".".join([*start, *([node.module] if node.module else [])])
                else:
                    base = node.module or ""
                for alias in node.names:
                    target = base if alias.name == "*" else f"{base}.{alias.name}"
                    yield Import(path, node.lineno, target, ast.unparse(node))


def _strongly_connected(graph: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (only nodes that are keys of ``graph`` recurse)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def _shortest_cycle(graph: Mapping[str, Sequence[str]], start: str, component: Sequence[str]) -> list[str]:
    """``start -> ... -> start`` through ``component`` (breadth first: the shortest, deterministic)."""
    inside = set(component)
    paths = [[start]]
    seen: set[str] = set()
    while paths:
        path = paths.pop(0)
        for nxt in graph.get(path[-1], ()):
            if nxt == start:
                return [*path, start]
            if nxt in inside and nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return [start, start]


def _dependency_order(loaded: Mapping[str, Module]) -> list[Module]:
    """Modules after what they depend on; those in a cycle or missing a dependency are left out."""
    ordered: list[Module] = []
    done: set[str] = set()
    progress = True
    while progress:
        progress = False
        for name, module in loaded.items():
            if name not in done and all(dep in done for dep in module.depends_on):
                ordered.append(module)
                done.add(name)
                progress = True
    return ordered


def _source_of(obj: Any, fallback: Path) -> tuple[Path, int]:
    try:
        path = inspect.getsourcefile(obj)
        _, line = inspect.getsourcelines(obj)
    except (OSError, TypeError):
        return fallback, 0
    return (Path(path), line) if path else (fallback, 0)


def _attribute_line(cls: type, attribute: str, fallback: Path) -> tuple[Path, int]:
    """Where ``attribute = ...`` is assigned in the body of ``cls``."""
    path, first = _source_of(cls, fallback)
    if not first:
        return path, 0
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, SyntaxError):
        return path, first
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == attribute for t in targets):
                return path, first + node.lineno - 1
    return path, first


def _keyword_line(path: Path, keyword: str) -> int:
    """The line of ``keyword=`` in the ``Module(...)`` call of a module.py (0 when not found)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return 0
    for node in ast.walk(tree):
        called = getattr(node, "func", None)
        if isinstance(node, ast.Call) and getattr(called, "id", getattr(called, "attr", None)) == "Module":
            for kw in node.keywords:
                if kw.arg == keyword:
                    return kw.value.lineno
            return node.lineno
    return 0


def _import_core_models() -> None:
    """Import the files of ``core`` that define tables, so core's tables are on the metadata."""
    import core

    for info in pkgutil.iter_modules(core.__path__):
        path = Path(core.__path__[0]) / f"{info.name}.py"
        if path.is_file() and "__tablename__" in path.read_text(encoding="utf-8"):
            importlib.import_module(f"core.{info.name}")
