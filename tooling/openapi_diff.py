"""What changed between two OpenAPI documents, sorted by what it means to a client already written.

``compare(old, new)`` returns ``Changes``:

- ``breaking``: a client that worked against ``old`` may fail against ``new``: an operation or a path
  removed, an operation id renamed, a new required parameter or body or body field, a parameter or
  field that became required, a request type, enum or constraint narrowed (fewer kinds of value,
  fewer enum values, a tighter bound, a new or changed pattern or format), a request field refused
  now, a success response or a response field removed, a response field that may now be absent or
  hold a new kind of value or a new enum value;
- ``additions``: new operations, optional parameters, optional body fields, responses and
  response fields: nothing a client relies on moves;
- ``other``: any other difference (a widened constraint, a new description or example, an error
  response no longer documented), so that a stale snapshot never passes unnoticed.

Pure functions over JSON-like dicts; ``$ref`` to ``#/components/schemas/`` is followed in each
document, cycles included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
REF = "#/components/schemas/"
LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
EXACT = ("pattern", "format", "multipleOf")
_NOT_CONSTRAINTS = ("anyOf", "oneOf", "title", "description", "default", "examples", "example")
_FROM = "x-diff-from"  # set by _kinds on what it found through a $ref: the component's name
_KIND_OF = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null",
            list: "array", dict: "object"}


@dataclass
class Changes:
    breaking: list[str] = field(default_factory=list)
    additions: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.breaking or self.additions or self.other)

    def report(self) -> str:
        """The changes as text, breaking ones first, one line each."""
        parts = []
        for title, lines in (("BREAKING changes", self.breaking), ("Additions", self.additions),
                             ("Other changes", self.other)):
            if lines:
                parts.append(f"{title} ({len(lines)}):\n" + "\n".join(f"  - {line}" for line in lines))
        return "\n".join(parts) or "no changes"


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> Changes:
    """The changes from ``old`` to ``new`` (two OpenAPI documents)."""
    diff = _Diff(old, new)
    diff.paths()
    if old != new and not diff.changes:
        diff.changes.other.append("descriptions, examples or other details changed")
    return diff.changes


class _Diff:
    def __init__(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        self.old, self.new = old, new
        self.changes = Changes()
        self._seen: set[tuple[str, str, str]] = set()

    # --- paths and operations -------------------------------------------------------------------

    def paths(self) -> None:
        old_paths: Mapping[str, Any] = self.old.get("paths", {})
        new_paths: Mapping[str, Any] = self.new.get("paths", {})
        for path in sorted(old_paths.keys() - new_paths.keys()):
            self.changes.breaking.append(f"removed path {path}")
        for path in sorted(new_paths.keys() | old_paths.keys()):
            old_item, new_item = old_paths.get(path), new_paths.get(path)
            if old_item is None or new_item is None:
                if new_item is not None:
                    self.changes.additions += [f"new operation {_name(m, path, op)}"
                                               for m, op in _operations(new_item)]
                continue
            old_ops, new_ops = dict(_operations(old_item)), dict(_operations(new_item))
            for method in sorted(old_ops.keys() - new_ops.keys()):
                self.changes.breaking.append(f"removed operation {_name(method, path, old_ops[method])}")
            for method in sorted(new_ops.keys() - old_ops.keys()):
                self.changes.additions.append(f"new operation {_name(method, path, new_ops[method])}")
            for method in sorted(old_ops.keys() & new_ops.keys()):
                self.operation(_name(method, path, new_ops[method]), old_item, new_item,
                               old_ops[method], new_ops[method])

    def operation(self, where: str, old_item: Mapping[str, Any], new_item: Mapping[str, Any],
                  old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        if old.get("operationId") != new.get("operationId"):
            self.changes.breaking.append(
                f"{where}: operation id {old.get('operationId')!r} renamed {new.get('operationId')!r}")
        self.parameters(where, _parameters(old_item, old), _parameters(new_item, new))
        self.request_body(where, old.get("requestBody"), new.get("requestBody"))
        self.responses(where, old.get("responses", {}), new.get("responses", {}))

    def parameters(self, where: str, old: Mapping[tuple[str, str], Any], new: Mapping[tuple[str, str], Any]
                   ) -> None:
        for key in sorted(old.keys() - new.keys()):
            self.changes.breaking.append(f"{where}: removed {key[0]} parameter {old[key]['name']}")
        for key in sorted(new.keys() - old.keys()):
            kind = "required" if new[key].get("required") else "optional"
            target = self.changes.breaking if kind == "required" else self.changes.additions
            target.append(f"{where}: new {kind} {key[0]} parameter {new[key]['name']}")
        for key in sorted(old.keys() & new.keys()):
            here = f"{where}: {key[0]} parameter {new[key]['name']}"
            self.required(here, bool(old[key].get("required")), bool(new[key].get("required")))
            self.request(here, old[key].get("schema", {}), new[key].get("schema", {}))

    def request_body(self, where: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> None:
        if old is None and new is None:
            return
        if old is None or new is None:
            if new is None:
                self.changes.breaking.append(f"{where}: removed the request body")
            elif new.get("required"):
                self.changes.breaking.append(f"{where}: new required request body")
            else:
                self.changes.additions.append(f"{where}: new optional request body")
            return
        self.required(f"{where}: request body", bool(old.get("required")), bool(new.get("required")))
        old_media, new_media = old.get("content", {}), new.get("content", {})
        for media in sorted(old_media.keys() - new_media.keys()):
            self.changes.breaking.append(f"{where}: request body no longer accepted as {media}")
        for media in sorted(new_media.keys() - old_media.keys()):
            self.changes.additions.append(f"{where}: request body now also accepted as {media}")
        for media in sorted(old_media.keys() & new_media.keys()):
            self.request(f"{where}: request body", old_media[media].get("schema", {}),
                         new_media[media].get("schema", {}))

    def responses(self, where: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        for status in sorted(old.keys() - new.keys()):
            if _success(status):
                self.changes.breaking.append(f"{where}: removed response {status}")
            else:
                self.changes.other.append(f"{where}: response {status} no longer documented")
        for status in sorted(new.keys() - old.keys()):
            self.changes.additions.append(f"{where}: new response {status}")
        for status in sorted(old.keys() & new.keys()):
            old_media, new_media = old[status].get("content", {}), new[status].get("content", {})
            for media in sorted(old_media.keys() - new_media.keys()):
                self.changes.breaking.append(f"{where}: response {status} no longer in {media}")
            for media in sorted(new_media.keys() - old_media.keys()):
                self.changes.additions.append(f"{where}: response {status} now also in {media}")
            for media in sorted(old_media.keys() & new_media.keys()):
                self.response(f"{where}: response {status}", old_media[media].get("schema", {}),
                              new_media[media].get("schema", {}))

    def required(self, where: str, old: bool, new: bool) -> None:
        if new and not old:
            self.changes.breaking.append(f"{where} is now required")
        elif old and not new:
            self.changes.other.append(f"{where} is now optional")

    # --- schemas: what a client sends (request) and what it reads (response) -------------------

    def request(self, where: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """Schemas of what a client sends: narrowing is breaking, widening is not."""
        old_kinds, new_kinds = _kinds(self.old, old), _kinds(self.new, new)
        if "any" not in new_kinds:
            for kind in sorted(old_kinds.keys() - new_kinds.keys()):
                if not (kind == "integer" and "number" in new_kinds):
                    self.changes.breaking.append(f"{where} no longer accepts {_a(kind)}")
        for kind in sorted(new_kinds.keys() - old_kinds.keys()):
            if "any" not in old_kinds:
                self.changes.other.append(f"{where} now also accepts {_a(kind)}")
        for kind in sorted(old_kinds.keys() & new_kinds.keys()):
            if self._first_visit("request", old_kinds[kind], new_kinds[kind]):
                self.request_constraints(where, old_kinds[kind], new_kinds[kind])

    def request_constraints(self, where: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        breaking, other = self.changes.breaking, self.changes.other
        old_enum, new_enum = _enum(old), _enum(new)
        if new_enum is not None:
            if old_enum is None:
                breaking.append(f"{where} is now limited to {len(new_enum)} value(s)")
            else:
                if old_enum - new_enum:
                    breaking.append(f"{where} no longer accepts {_values(old_enum - new_enum)}")
                if new_enum - old_enum:
                    other.append(f"{where} now also accepts {_values(new_enum - old_enum)}")
        elif old_enum is not None:
            other.append(f"{where} is no longer limited to a list of values")
        for key in LOWER_BOUNDS + UPPER_BOUNDS:
            before, after = old.get(key), new.get(key)
            if before == after:
                continue
            tighter = after is not None and (before is None or (after > before if key in LOWER_BOUNDS
                                                                  else after < before))
            (breaking if tighter else other).append(f"{where}: {key} {before} -> {after}")
        for key in EXACT:
            before, after = old.get(key), new.get(key)
            if before != after:
                (breaking if after is not None else other).append(f"{where}: {key} {before!r} -> {after!r}")
        self.request_object(where, old, new)
        if "items" in old and "items" in new:
            self.request(f"{where}[]", old["items"], new["items"])

    def request_object(self, where: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
        closed = new.get("additionalProperties") is False
        if closed and old.get("additionalProperties") is not False:
            self.changes.breaking.append(f"{where} now refuses fields it does not list")
        for name in sorted(old_props.keys() - new_props.keys()):
            target = self.changes.breaking if closed else self.changes.other
            target.append(f"{where}: field {name} removed" + (" (now refused)" if closed else ""))
        for name in sorted(new_props.keys() - old_props.keys()):
            if name in new_required:
                self.changes.breaking.append(f"{where}: new required field {name}")
            else:
                self.changes.additions.append(f"{where}: new optional field {name}")
        for name in sorted(old_props.keys() & new_props.keys()):
            here = f"{where}.{name}"
            self.required(here, name in old_required, name in new_required)
            self.request(here, old_props[name], new_props[name])

    def response(self, where: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        """Schemas of what a client reads: anything it may now receive that it could not before is
        breaking, and so is anything it could rely on that is gone."""
        old_kinds, new_kinds = _kinds(self.old, old), _kinds(self.new, new)
        for kind in sorted(new_kinds.keys() - old_kinds.keys()):
            if "any" not in old_kinds and not (kind == "integer" and "number" in old_kinds):
                self.changes.breaking.append(f"{where} may now be {_a(kind)}")
        for kind in sorted(old_kinds.keys() - new_kinds.keys()):
            self.changes.other.append(f"{where} is no longer {_a(kind)}")
        for kind in sorted(old_kinds.keys() & new_kinds.keys()):
            before, after = old_kinds[kind], new_kinds[kind]
            if not self._first_visit("response", before, after):
                continue
            old_enum, new_enum = _enum(before), _enum(after)
            if new_enum is not None and old_enum is not None and new_enum - old_enum:
                self.changes.breaking.append(f"{where} may now be {_values(new_enum - old_enum)}")
            old_props, new_props = before.get("properties", {}), after.get("properties", {})
            old_required, new_required = set(before.get("required", [])), set(after.get("required", []))
            for name in sorted(old_props.keys() - new_props.keys()):
                self.changes.breaking.append(f"{where}: removed response field {name}")
            for name in sorted(new_props.keys() - old_props.keys()):
                self.changes.additions.append(f"{where}: new response field {name}")
            for name in sorted(old_props.keys() & new_props.keys()):
                if name in old_required and name not in new_required:
                    self.changes.breaking.append(f"{where}.{name} may now be absent")
                self.response(f"{where}.{name}", old_props[name], new_props[name])
            if "items" in before and "items" in after:
                self.response(f"{where}[]", before["items"], after["items"])

    def _first_visit(self, side: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
        """False for a pair of named schemas already compared on this side (a cycle, or a schema
        shared by many places, reported once)."""
        old_ref, new_ref = old.get(_FROM), new.get(_FROM)
        if not isinstance(old_ref, str) or not isinstance(new_ref, str):
            return True
        key = (side, old_ref, new_ref)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def _operations(item: Mapping[str, Any]) -> Iterable[tuple[str, Mapping[str, Any]]]:
    return [(method, item[method]) for method in METHODS if method in item]


def _name(method: str, path: str, operation: Mapping[str, Any]) -> str:
    known = operation.get("operationId")
    return f"{method.upper()} {path}" + (f" ({known})" if known else "")


def _parameters(item: Mapping[str, Any], operation: Mapping[str, Any]) -> dict[tuple[str, str], Any]:
    """The operation's parameters (its path item's too) by place and name (a header's in lower case)."""
    found = {}
    for parameter in [*item.get("parameters", []), *operation.get("parameters", [])]:
        name = parameter["name"].lower() if parameter.get("in") == "header" else parameter["name"]
        found[(parameter.get("in", ""), name)] = parameter
    return found


def _success(status: str) -> bool:
    return status.startswith("2") or status.startswith("3")


def _resolve(document: Mapping[str, Any], schema: Mapping[str, Any]) -> Mapping[str, Any]:
    seen: set[str] = set()
    while True:
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith(REF) or ref in seen:
            return schema
        seen.add(ref)
        target = document.get("components", {}).get("schemas", {}).get(ref.removeprefix(REF))
        if target is None:
            return {}
        schema = target


def _kinds(document: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The kinds of JSON value ``schema`` admits (string, integer, null, object, ..., or "any"), each
    with the schema that constrains it (marked with the component it came from, if any)."""
    ref = schema.get("$ref")
    found = _kinds_of(document, _resolve(document, schema))
    if isinstance(ref, str):
        return {kind: {**inner, _FROM: ref} for kind, inner in found.items()}
    return found


def _kinds_of(document: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    if "allOf" in schema:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            merged.update(_resolve(document, part))
        schema = merged
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if alternatives:
        # Constraints written beside anyOf (FastAPI puts a form field's pattern there) apply to each.
        outer = {k: v for k, v in schema.items() if k not in _NOT_CONSTRAINTS}
        found: dict[str, Mapping[str, Any]] = {}
        for alternative in alternatives:
            for kind, inner in _kinds(document, alternative).items():
                found[kind] = inner if kind == "null" else {**outer, **inner}
        return found
    declared = schema.get("type")
    if isinstance(declared, list):
        return {kind: {**schema, "type": kind} for kind in declared}
    if isinstance(declared, str):
        return {declared: schema}
    values = _enum(schema)
    if values is not None:
        return {_KIND_OF.get(type(value), "any"): schema for value in values}
    if "properties" in schema:
        return {"object": schema}
    return {"any": schema}


def _enum(schema: Mapping[str, Any]) -> frozenset[Any] | None:
    if "const" in schema:
        return frozenset([_hashable(schema["const"])])
    if "enum" in schema:
        return frozenset(_hashable(v) for v in schema["enum"])
    return None


def _hashable(value: Any) -> Any:
    return repr(value) if isinstance(value, list | dict) else value


def _values(values: Iterable[Any]) -> str:
    return ", ".join(repr(v) for v in sorted(values, key=repr))


def _a(kind: str) -> str:
    return {"null": "null", "any": "any value", "integer": "an integer", "object": "an object",
            "array": "an array"}.get(kind, f"a {kind}")
