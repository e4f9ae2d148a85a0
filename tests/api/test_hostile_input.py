"""Hostile input never makes a 5xx (issue 15): every operation of the OpenAPI document, on both profiles.

The operations come from ``app.openapi()`` (every path and method), so a new module's routes are
driven without editing this file. Two phases, both derived from each operation's own schemas:

- the sweep: for each path id the run knows, each path and query parameter and each body field (at
  any depth) in turn, that one place hostile (a NUL, a lone surrogate, a control character; an
  integer past 32 or 64 bits) and the rest the plainest valid request, sent as an admin. This is
  what reaches the database with a bad value: it found the 500s of issue 15 on the code before it;
- hypothesis: for each operation and each caller (anonymous, a user, an admin, a forged token),
  requests drawn from the schemas with part of them hostile: control characters, lone surrogates
  (raw JSON ``"\\ud800"``), integers past 32 and 64 bits, NaN and Infinity, empty and very long
  strings, wrong JSON types, deeply nested and malformed JSON, invalid UUIDs in paths, a missing or
  wrong Content-Type, a body over the limit. A body is valid, or valid but for one part (so that part
  reaches as deep as it can), or hostile as a whole, or raw bytes.

Each answer must be below 500, and each error must be the envelope. Nothing written when refused:
the row count of every module table (and of the idempotency keys) is taken just before and just
after each request, and must be unchanged when the answer is not a 2xx. That is sound here because
those tables gain and lose rows only in a request's own transaction: the workers' jobs update
rows, write inbox and outbox rows (left out) and purge expired idempotency keys (a day old), so no
background write can move a count between the two readings. A module whose jobs insert into its
own tables would need its tables left out here.

Budget: the sweep (about 400 requests) and ``HOSTILE_EXAMPLES`` examples per operation and caller
(default 30; 22 operations x 4 callers today), each hypothesis run with a fixed seed so CI is
reproducible, no example database. About 3,100 requests and 50 s per profile on a 2-core machine
(4,800 requests and 75-80 s at 50 examples, which CI could no longer afford); the count and the
time are printed at the end of each profile's run. ``HOSTILE_EXAMPLES=300`` makes a deeper local
run.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, Phase, find, given, seed, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.edge.idempotency import IdempotencyKey
from tests.support.api import bearer, make_admin, sign_up
from tests.support.stack import Stack

EXAMPLES = int(os.environ.get("HOSTILE_EXAMPLES", "30"))
CALLERS = ("anonymous", "user", "admin", "forged")
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"

# --- hostile values -------------------------------------------------------------------------------

HUGE_INTS = [2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30,
             -(10**30), 10**400]
ODD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 1.5, 1e308, 5e-324, 2.0**63]
CONTROL = ["\x00", "a\x00b", "\x00" * 8, "\x01\x02\x03", "\x1b[31m", "\x08", "\x7f", "line\nbreak", "cr\rlf",
           "tab\tin", "\x0b\x0c", "\x1f", "\x85", "end\x00"]
SURROGATES = ["\ud800", "x\udfffy", "\udbff", "a\ud83d"]  # lone halves: json.dumps writes "\ud800"
ODD_TEXT = ["", " ", "   ", "\u00a0", "\ufeff", "\u2028\u2029", "\u202e", "e\u0301", "\U0001f600" * 3,
            "ß" * 150, "İ", "\uffff", "\U0010ffff", "'; DROP TABLE items; --", "%", "_", "\\", "%00", "../..",
            "{{7*7}}", "<svg onload=1>", "null", "NaN", "-0", "1e309", "0x10", "9" * 5000, "x" * 5000,
            "é" * 70_000]
HOSTILE_TEXT = CONTROL + SURROGATES + ODD_TEXT
# In a URL or a header: as long as a server would still pass on (httpx refuses URLs over 64 kB).
SHORT_HOSTILE_TEXT = [t for t in HOSTILE_TEXT if len(t) <= 2000]
WRONG_TYPES: list[Any] = [None, True, False, 0, -1, 1.5, "", "a", [], [[]], {}, {"": ""}, [None, None],
                          *HUGE_INTS, *ODD_FLOATS]
BAD_PATH_IDS = ["not-a-uuid", "0", "-1", "00000000-0000-0000-0000-000000000000",
                "ffffffff-ffff-ffff-ffff-ffffffffffff", "{12345678-1234-5678-1234-567812345678}",
                "urn:uuid:12345678-1234-5678-1234-567812345678", "12345678123456781234567812345678",
                "12345678-1234-5678-1234-5678123456789", "..", ".", "a" * 5000, "é", *CONTROL, *SURROGATES]
RAW_BODIES = [b"", b"{", b"[", b"}", b'{"a":}', b"nul", b"tru", b"\x00", b"\xff\xfe\xfd", b"\xef\xbb\xbf{}",
              b'"\\ud800"', b'{"\\u0000": 1}', b"NaN", b"-Infinity", b"1" * 5000, b"[1e999999]",
              b'{"a":1,"a":2}', b"{} {}", b"[" * 50_000 + b"]" * 50_000,
              b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
              b"x" * ((1 << 20) + 1)]
OTHER_TYPES = [None, "text/plain", "application/xml", "application/json; charset=utf-16",
               "application/json; charset=latin-1", "multipart/form-data; boundary=zz", FORM,
               "application/merge-patch+json", "*/*", "application/jsonx"]
OTHER_FORM_TYPES = [JSON, None, "multipart/form-data; boundary=zz", "text/plain",
                    "application/x-www-form-urlencoded; charset=latin-1"]
FORGED_TOKENS = [b"Bearer x", b"Bearer " + b"a" * 5000, b"Bearer a.b.c", b"Basic Zm9vOmJhcg==", b"Bearer",
                 b"bearer eyJhbGciOiJub25lIn0.e30.", b"Bearer \xe9\xff", b"Bearer  ", b"Token abc"]
HEADER_TEXT = ["", " ", "a" * 300, "\xe9", "\xff" * 10, "key with spaces", "\t", "x" * 9000, "W/\"x\", *",
               "*",
               "\"unterminated"]


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# --- the OpenAPI document as strategies -----------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # path, query, header
    schema: dict[str, Any]
    required: bool


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    params: tuple[Param, ...]
    body: tuple[str, dict[str, Any], bool] | None  # media type, schema, required

    @property
    def key(self) -> str:
        return f"{self.method} {self.path}"


def operations(document: dict[str, Any]) -> list[Operation]:
    found = []
    for path, item in sorted(document["paths"].items()):
        shared = item.get("parameters", [])
        for method, spec in sorted(item.items()):
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            params = tuple(Param(p["name"], p["in"], p.get("schema", {}), bool(p.get("required")))
                           for p in [*shared, *spec.get("parameters", [])] if p["in"] != "cookie")
            body = None
            if "requestBody" in spec:
                content = spec["requestBody"]["content"]
                media = JSON if JSON in content else sorted(content)[0]
                body = (media, content[media].get("schema", {}), bool(spec["requestBody"].get("required")))
            found.append(Operation(method.upper(), path, params, body))
    return found


class Schemas:
    """JSON Schema (as FastAPI documents it) -> hypothesis strategies of valid and hostile values."""

    def __init__(self, document: dict[str, Any], known_ids: list[str]) -> None:
        self.components: dict[str, Any] = document.get("components", {}).get("schemas", {})
        self.known_ids = known_ids  # grows as 2xx answers name new ids

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            schema = self.components[schema["$ref"].rsplit("/", 1)[-1]]
        if "allOf" in schema:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                merged.update(self.resolve(part))
            return {**merged, **{k: v for k, v in schema.items() if k != "allOf"}}
        return schema

    def kinds(self, schema: dict[str, Any]) -> set[str]:
        schema = self.resolve(schema)
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if alternatives:
            return set().union(*(self.kinds(s) for s in alternatives))
        kind = schema.get("type")
        if isinstance(kind, list):
            return set(kind)
        return {kind} if kind else ({"object"} if "properties" in schema else set())

    def known_id(self) -> SearchStrategy[str]:
        """An id a 2xx answer named (drawn by position, so ids harvested later are reachable), or any."""
        ids = self.known_ids
        return st.one_of(st.integers(0, 10_000).map(lambda i: ids[i % len(ids)]), st.uuids().map(str))

    def valid(self, schema: dict[str, Any]) -> SearchStrategy[Any]:
        schema = self.resolve(schema)
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        alternatives = schema.get("anyOf") or schema.get("oneOf")
        if alternatives:
            return st.one_of([self.valid(s) for s in alternatives])
        examples = list(schema.get("examples") or []) + ([schema["example"]] if "example" in schema else [])
        generic = self._generic(schema)
        return st.one_of(st.sampled_from(examples), generic) if examples else generic

    def _generic(self, schema: dict[str, Any]) -> SearchStrategy[Any]:
        kind = schema.get("type")
        if kind == "string":
            return self._text(schema)
        if kind == "integer":
            return st.integers(min_value=_bound(schema, "minimum", "exclusiveMinimum", 1),
                               max_value=_bound(schema, "maximum", "exclusiveMaximum", -1))
        if kind == "number":
            return st.floats(allow_nan=False, allow_infinity=False, min_value=schema.get("minimum"),
                             max_value=schema.get("maximum"))
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            low = int(schema.get("minItems", 0))
            return st.lists(self.valid(schema.get("items", {})), min_size=low,
                            max_size=max(low, min(int(schema.get("maxItems", 3)), 3)))
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties", {})
            required = set(schema.get("required", []))
            return st.fixed_dictionaries(
                {name: self.valid(s) for name, s in properties.items() if name in required},
                optional={name: self.valid(s) for name, s in properties.items() if name not in required},
            )
        return st.text(max_size=10)

    def _text(self, schema: dict[str, Any]) -> SearchStrategy[str]:
        fmt = schema.get("format")
        if fmt == "uuid":
            return self.known_id()
        if fmt == "email":
            return st.emails()
        if fmt == "date-time":
            return st.datetimes(timezones=st.just(UTC)).map(datetime.isoformat)
        low = int(schema.get("minLength", 0))
        high = max(low, min(int(schema.get("maxLength", 40)), 40))
        if "pattern" in schema:
            return (st.from_regex(schema["pattern"], fullmatch=True).map(lambda s: s[:high])
                    .filter(lambda s: len(s) >= low))
        return st.text(st.characters(categories=("L", "N", "P", "Zs")), min_size=low, max_size=high)

    def hostile(self, schema: dict[str, Any], *, short: bool = False) -> SearchStrategy[Any]:
        """A value that a client should not send for ``schema``: wrong type, out of range, bad text
        (``short``: no text longer than a URL or a header may carry)."""
        texts = SHORT_HOSTILE_TEXT if short else HOSTILE_TEXT
        kinds = self.kinds(schema)
        options: list[SearchStrategy[Any]] = [st.sampled_from(WRONG_TYPES)]
        if "string" in kinds or not kinds:
            options += [st.sampled_from(texts), _text_with(st.sampled_from(CONTROL + SURROGATES))]
        if kinds & {"integer", "number"}:
            options += [st.sampled_from(HUGE_INTS), st.integers(), st.sampled_from(ODD_FLOATS)]
        if "array" in kinds:
            options += [st.lists(st.sampled_from(WRONG_TYPES), max_size=4), st.just(_deep(200)),
                        st.just([{}] * 1000)]
        if "object" in kinds:
            options += [st.just({"": None}), st.dictionaries(st.sampled_from(HOSTILE_TEXT),
                                                             st.sampled_from(WRONG_TYPES), max_size=3)]
        return st.one_of(options)

    def mutated(self, schema: dict[str, Any]) -> SearchStrategy[Any]:
        """Valid but for one part: a field made hostile (at any depth), dropped, or one added."""
        schema = self.resolve(schema)
        kinds = self.kinds(schema)
        if "object" in kinds and schema.get("properties"):
            properties: dict[str, Any] = schema["properties"]
            names = sorted(properties)
            required = sorted(schema.get("required", [])) or names

            def mutate(base: dict[str, Any]) -> SearchStrategy[dict[str, Any]]:
                return st.one_of(
                    st.sampled_from(names).flatmap(
                        lambda n: self.mutated(properties[n]).map(lambda v: {**base, n: v})),
                    st.sampled_from(required).map(lambda n: {k: v for k, v in base.items() if k != n}),
                    st.sampled_from(HOSTILE_TEXT).map(lambda k: {**base, k: 1}),
                )

            return self.valid(schema).flatmap(mutate)
        if "array" in kinds and "items" in schema:
            return st.one_of(st.lists(self.mutated(schema["items"]), min_size=1, max_size=3),
                             self.hostile(schema))
        return self.hostile(schema)


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str, step: int) -> int | None:
    if inclusive in schema:
        return int(schema[inclusive])
    if exclusive in schema:
        return int(schema[exclusive]) + step
    return None


def _text_with(bad: SearchStrategy[str]) -> SearchStrategy[str]:
    """Plain text with a hostile character somewhere inside."""
    plain = st.text(st.characters(categories=("L", "N")), max_size=8)
    return st.tuples(plain, bad, plain).map("".join)


def _as_text(value: Any) -> str | None:
    """A JSON value as a query, path or form parameter carries it."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _encode(value: str) -> str:
    return quote(value, safe="", errors="surrogatepass")


# --- one request ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    operation: str
    caller: str
    method: str
    url: str
    headers: tuple[tuple[str, bytes], ...]
    content: bytes | None

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # what hypothesis prints on a failure
        printer.text(repr(self))

    def __repr__(self) -> str:
        body = None if self.content is None else self.content[:300]
        # The caller names the Authorization header; a forged one is shown, a real token is not.
        headers = [(k, v) for k, v in self.headers if k != "Authorization" or self.caller == "forged"]
        return (f"Case({self.method} {self.url[:300]!r} as {self.caller}, headers={headers!r:.400}, "
                f"body={body!r} ({0 if self.content is None else len(self.content)} bytes))")


def case_strategy(op: Operation, caller: str, schemas: Schemas, tokens: dict[str, str]
                  ) -> SearchStrategy[Case]:
    @st.composite
    def draw_case(draw: Callable[[SearchStrategy[Any]], Any]) -> Case:
        path, query, headers = op.path, [], []
        for p in op.params:
            if p.where == "path":
                raw = draw(st.one_of(schemas.valid(p.schema).map(_as_text), st.sampled_from(BAD_PATH_IDS),
                                     schemas.hostile(p.schema, short=True).map(_as_text)))
                path = path.replace("{" + p.name + "}", _encode(raw or ""))
                continue
            value = draw(st.one_of(st.none(), schemas.valid(p.schema).map(_as_text),
                                   schemas.hostile(p.schema, short=True).map(_as_text)))
            if value is None:
                continue
            if p.where == "query":
                query.append((p.name, value))
            elif p.where == "header":
                text = draw(st.one_of(st.just(value), st.sampled_from(HEADER_TEXT)))
                headers.append((p.name, text.encode("latin-1", errors="replace")))
        extra = draw(st.sampled_from([None, ("unknown", "\x00"), ("limit", "1"), ("limit", "0")]))
        if extra is not None:
            query.append(extra)
        url = path + ("?" + urlencode(query, errors="surrogatepass") if query else "")

        if caller == "forged":
            headers.append(("Authorization", draw(st.sampled_from(FORGED_TOKENS))))
        elif caller in tokens:
            headers.append(("Authorization", f"Bearer {tokens[caller]}".encode()))

        content: bytes | None = None
        if op.body is not None:
            media, schema, _ = op.body
            kind = draw(st.sampled_from(["valid", "mutated", "hostile", "raw", "none"]))
            if kind == "raw":
                content = draw(st.sampled_from(RAW_BODIES))
            elif kind != "none":
                strategy = {"valid": schemas.valid, "mutated": schemas.mutated,
                            "hostile": schemas.hostile}[kind]
                value = draw(strategy(schema))
                if media == FORM and isinstance(value, dict):
                    pairs = [(k, t) for k, v in value.items() if (t := _as_text(v)) is not None]
                    content = urlencode(pairs, errors="surrogatepass").encode()
                else:
                    content = json.dumps(value).encode()  # ASCII: lone surrogates become "\ud800"
            # Half of the bodies go with the declared media type, so valid ones can reach the endpoint.
            others = OTHER_FORM_TYPES if media == FORM else OTHER_TYPES
            content_type = draw(st.one_of(st.just(media), st.sampled_from(others)))
            if content_type is not None:
                headers.append(("Content-Type", content_type.encode()))
        elif draw(st.integers(0, 9)) < (5 if op.method != "GET" else 1):  # a body none was declared for
            content = draw(st.sampled_from(RAW_BODIES[:6]))
            headers.append(("Content-Type", JSON.encode()))
        return Case(op.key, caller, op.method, url, tuple(headers), content)

    return draw_case()


# --- the sweep: one part hostile, the rest the simplest valid value -------------------------------

# Per kind of slot: the values that once reached the database (issue 15), and their neighbours.
SWEEP_TEXT = ["a\x00b", "x\ud800", "esc\x1b[0m", "two\nlines"]
SWEEP_INTS = [2**31, 2**63, 2**64, -(2**63) - 1, 10**30]


_PATTERNS: dict[str, str] = {}


def simplest(schemas: Schemas, schema: dict[str, Any]) -> Any:
    """A plain valid value of ``schema``: its first example, else the lower bound, one element, the
    required fields. An email is new each time (a sign-up must not stop at email_taken)."""
    schema = schemas.resolve(schema)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if alternatives:
        typed = [s for s in alternatives if schemas.resolve(s).get("type") != "null"] or alternatives
        return simplest(schemas, typed[0])
    if schema.get("examples"):
        return schema["examples"][0]
    kind = schema.get("type")
    if kind == "string":
        fmt = schema.get("format")
        if fmt == "uuid":
            return schemas.known_ids[0]
        if fmt == "email":
            return f"sweep-{uuid.uuid4().hex[:12]}@example.com"
        if fmt == "date-time":
            return "2026-01-01T00:00:00+00:00"
        if "pattern" in schema:  # the shortest text hypothesis finds for it, once per pattern
            pattern = schema["pattern"]
            if pattern not in _PATTERNS:
                _PATTERNS[pattern] = find(st.from_regex(pattern, fullmatch=True), lambda _: True,
                                          settings=settings(database=None, deadline=None))
            return _PATTERNS[pattern]
        return "a" * max(int(schema.get("minLength", 0)), 1)
    if kind in ("integer", "number"):
        low = _bound(schema, "minimum", "exclusiveMinimum", 1)
        high = _bound(schema, "maximum", "exclusiveMaximum", -1)
        value = 1 if low is None else low
        return value if high is None else min(value, high)
    if kind == "boolean":
        return False
    if kind == "array":
        return [simplest(schemas, schema.get("items", {}))] * max(int(schema.get("minItems", 0)), 1)
    if kind == "object" or "properties" in schema:
        return {name: simplest(schemas, inner) for name, inner in schema.get("properties", {}).items()
                if name in schema.get("required", [])}
    return None


def slots(schemas: Schemas, schema: dict[str, Any], where: tuple[str | int, ...] = ()
          ) -> Iterator[tuple[tuple[str | int, ...], set[str]]]:
    """Every scalar place of a JSON document of ``schema`` (fields at any depth; the first element of
    an array), with the kinds of value it holds."""
    schema = schemas.resolve(schema)
    alternatives = [schemas.resolve(s) for s in schema.get("anyOf") or schema.get("oneOf") or []]
    for candidate in [schema, *alternatives]:
        if candidate.get("properties"):
            for name, inner in candidate["properties"].items():
                yield from slots(schemas, inner, (*where, name))
            return
        if candidate.get("type") == "array" and "items" in candidate:
            yield from slots(schemas, candidate["items"], (*where, 0))
            return
    yield where, schemas.kinds(schema)


def placed(schemas: Schemas, schema: dict[str, Any], base: Any, where: tuple[str | int, ...],
           value: Any) -> Any:
    """``base`` with ``value`` at ``where``, building the containers on the way from ``schema``."""
    if not where:
        return value
    schema = schemas.resolve(schema)
    alternatives = [schemas.resolve(s) for s in schema.get("anyOf") or schema.get("oneOf") or []]
    for candidate in [schema, *alternatives]:
        head, rest = where[0], where[1:]
        if isinstance(head, int) and candidate.get("type") == "array":
            items = candidate.get("items", {})
            listed = list(base) if isinstance(base, list) and base else [simplest(schemas, items)]
            listed[0] = placed(schemas, items, listed[0], rest, value)
            return listed
        if isinstance(head, str) and head in candidate.get("properties", {}):
            inner = candidate["properties"][head]
            current = dict(base) if isinstance(base, dict) else {}
            start = current[head] if head in current else simplest(schemas, inner)
            current[head] = placed(schemas, inner, start, rest, value)
            return current
    return value


def sweep(op: Operation, schemas: Schemas, token: str) -> Iterator[Case]:
    """For each path id the run knows, each parameter and each body slot in turn: that one place
    hostile (a NUL, a lone surrogate, a control character; an integer past 32 or 64 bits), the rest
    the simplest valid request, sent as an admin with the declared media type."""
    headers = [("Authorization", f"Bearer {token}".encode())]
    query_base = {p.name: _as_text(simplest(schemas, p.schema))
                  for p in op.params if p.where == "query" and p.required}
    body_base = None if op.body is None else simplest(schemas, op.body[1])
    path_params = [p for p in op.params if p.where == "path"]
    # Each of the first ids the run knows (the seeded user, item, invoices and payment) in turn.
    knowns: list[str | None] = list(schemas.known_ids[:5]) if path_params else [None]

    def url(path_values: dict[str, str], query: dict[str, str | None]) -> str:
        path = op.path
        for name, value in path_values.items():
            path = path.replace("{" + name + "}", _encode(value))
        pairs = [(k, v) for k, v in query.items() if v is not None]
        return path + ("?" + urlencode(pairs, errors="surrogatepass") if pairs else "")

    def hostile_for(kinds: set[str]) -> list[Any]:
        found: list[Any] = []
        if "string" in kinds or not kinds:
            found += SWEEP_TEXT
        if kinds & {"integer", "number"}:
            found += SWEEP_INTS
        return found

    def body_case(path_values: dict[str, str], body: Any) -> Case:
        assert op.body is not None
        media = op.body[0]
        if media == FORM and isinstance(body, dict):
            pairs = [(k, t) for k, v in body.items() if (t := _as_text(v)) is not None]
            content = urlencode(pairs, errors="surrogatepass").encode()
        else:
            content = json.dumps(body).encode()
        return Case(op.key, "admin", op.method, url(path_values, query_base),
                    (*headers, ("Content-Type", media.encode())), content)

    for known in knowns:
        path_values = {p.name: str(known) for p in path_params}
        for p in op.params:
            if p.where not in ("path", "query"):
                continue
            candidates = hostile_for(schemas.kinds(p.schema))
            if p.where == "path":  # any text can be written into a path, whatever the parameter's type
                candidates += [t for t in SWEEP_TEXT if t not in candidates]
            for value in candidates:
                values = path_values
                if p.where == "path":
                    values = {**path_values, p.name: _as_text(value) or ""}
                query = {**query_base, p.name: _as_text(value)} if p.where == "query" else query_base
                content = None if op.body is None else json.dumps(body_base).encode()
                extra = () if op.body is None else (("Content-Type", op.body[0].encode()),)
                yield Case(op.key, "admin", op.method, url(values, query), (*headers, *extra), content)
        if op.body is not None:
            for where, kinds in slots(schemas, op.body[1]):
                for value in hostile_for(kinds):
                    yield body_case(path_values, placed(schemas, op.body[1], body_base, where, value))


# --- the run --------------------------------------------------------------------------------------


@dataclass
class World:
    stack: Stack
    operations: list[Operation]
    schemas: Schemas
    tokens: dict[str, str]
    tables: list[Any]  # the module tables and the idempotency keys
    statuses: Counter[int] = field(default_factory=Counter)
    per_operation: dict[str, Counter[int]] = field(default_factory=dict)
    driven: set[tuple[str, str]] = field(default_factory=set)  # (operation, caller) pairs sent

    @property
    def engine(self) -> AsyncEngine:
        engine: AsyncEngine = self.stack.container.engine()
        return engine

    async def row_counts(self) -> dict[str, int]:
        statement = select(*[select(func.count()).select_from(t).scalar_subquery().label(t.name)
                             for t in self.tables])
        async with self.engine.connect() as connection:
            return dict((await connection.execute(statement)).one()._mapping)

    async def send(self, case: Case) -> None:
        before = await self.row_counts()
        try:
            headers = [(name.encode(), value) for name, value in case.headers]
            response = await self.stack.client.request(case.method, case.url, headers=headers,
                                                       content=case.content)
        except Exception as exc:  # the app raised past its error middleware: as bad as a 500
            raise AssertionError(f"{case!r} raised {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        self.statuses[status] += 1
        self.driven.add((case.operation, case.caller))
        self.per_operation.setdefault(case.operation, Counter())[status] += 1
        request_id = response.headers.get("x-request-id")
        assert status < 500, f"{case!r} answered {status} (request id {request_id}): {response.text[:500]}"
        if status >= 400:
            error = response.json().get("error")
            outside = f"{case!r} answered {status} outside the envelope: {response.text[:300]}"
            assert isinstance(error, dict), outside
            assert set(error) == {"code", "message", "details"}, outside
        after = await self.row_counts()
        if 200 <= status < 300:
            self.harvest(response)
        else:
            changed = {t: (before[t], after[t]) for t in before if before[t] != after[t]}
            assert not changed, f"{case!r} answered {status} but changed row counts {changed}"

    async def ensure_tokens(self) -> None:
        """Fresh tokens when the run made them invalid (it may log out, or change a password)."""
        for caller in ("user", "admin"):
            check = await self.stack.client.get("/api/v1/users/me", headers=bearer(self.tokens[caller]))
            if check.status_code == 200:
                continue
            if caller == "admin":
                self.tokens[caller] = await make_admin(self.stack)
            else:
                user, self.tokens[caller] = await sign_up(self.stack.client)
                self.schemas.known_ids.append(user["id"])

    def harvest(self, response: httpx.Response) -> None:
        """Remember the ids a 2xx answer names, so later paths and bodies can point at real rows."""
        if not response.headers.get("content-type", "").startswith(JSON):
            return
        stack: list[Any] = [response.json()]
        while stack and len(self.schemas.known_ids) < 500:
            value = stack.pop()
            if isinstance(value, dict):
                for key, inner in value.items():
                    if key.endswith("id") and isinstance(inner, str) and _is_uuid(inner) \
                            and inner not in self.schemas.known_ids:
                        self.schemas.known_ids.append(inner)
                    stack.append(inner)
            elif isinstance(value, list):
                stack.extend(value)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
async def world(stack: Stack) -> World:
    """Operations, callers and real rows to point at: an item, invoices, a payment, users."""
    client = stack.client
    me, user_token = await sign_up(client)
    admin_token = await make_admin(stack)
    user, admin = bearer(user_token), bearer(admin_token)
    item = await client.post("/api/v1/items", json={"name": "hostile seed", "price": 100, "currency": "EUR"},
                             headers=admin)
    assert item.status_code == 201, item.text
    lines = {"lines": [{"item_id": item.json()["id"], "quantity": 1}]}
    paid, payable = [await client.post("/api/v1/invoices", json=lines, headers=user) for _ in range(2)]
    payment = await client.post(f"/api/v1/invoices/{paid.json()['id']}/payments",
                                json={"payment_token": "tok_visa"},
                                headers={**user, "Idempotency-Key": uuid.uuid4().hex})
    assert payment.status_code == 202, payment.text
    # The item first: an id in a body (an invoice line) is the sweep's first known id.
    known = [item.json()["id"], me["id"], paid.json()["id"], payable.json()["id"], payment.json()["id"]]
    document = stack.app.openapi()
    tables = [model.__table__ for module in stack.app.state.modules for model in module.models]
    return World(stack, operations(document), Schemas(document, known),
                 {"user": user_token, "admin": admin_token}, [*tables, IdempotencyKey.__table__])


def _run_all(world: World, loop: asyncio.AbstractEventLoop) -> int:
    """Hypothesis, in a thread: each example is sent on the app's event loop and awaited here."""
    cases = 0
    # Every sweep first: they point at the seeded rows, which the random phase may delete.
    for op in world.operations:
        asyncio.run_coroutine_threadsafe(world.ensure_tokens(), loop).result(timeout=120)
        for case in sweep(op, world.schemas, world.tokens["admin"]):
            cases += 1
            asyncio.run_coroutine_threadsafe(world.send(case), loop).result(timeout=120)
    for op in world.operations:
        for caller in CALLERS:
            asyncio.run_coroutine_threadsafe(world.ensure_tokens(), loop).result(timeout=120)

            @seed(zlib.crc32(f"{op.key} {caller}".encode()))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=False,
                      phases=[Phase.explicit, Phase.generate, Phase.shrink],
                      suppress_health_check=list(HealthCheck))
            @given(case=case_strategy(op, caller, world.schemas, world.tokens))
            def probe(case: Case) -> None:
                nonlocal cases
                cases += 1
                asyncio.run_coroutine_threadsafe(world.send(case), loop).result(timeout=120)

            probe()
    return cases


# The app's background tasks (the outbox relay, the in-process worker) run on the event loop while
# hypothesis draws in its thread, and some of them use the random module; the draws never do.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
async def test_no_hostile_input_makes_a_5xx_or_leaves_a_row(
    world: World, capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None]
) -> None:
    started = time.perf_counter()
    cases = await asyncio.to_thread(_run_all, world, asyncio.get_running_loop())
    elapsed = time.perf_counter() - started

    record_property("hostile_cases", cases)
    record_property("hostile_seconds", round(elapsed, 1))
    with capsys.disabled():
        print(f"\nhostile input [{world.stack.profile}]: {cases} requests over {len(world.operations)} "
              f"operations x {len(CALLERS)} callers in {elapsed:.1f} s; "
              f"statuses {dict(sorted(world.statuses.items()))}")
    assert world.driven == {(op.key, caller) for op in world.operations for caller in CALLERS}


def test_the_schema_walker_sees_every_part_of_a_document() -> None:
    """The walker itself: operations, parameters and bodies are found, refs resolved, bounds kept."""
    document = {
        "paths": {"/things/{thing_id}": {
            "parameters": [{"name": "thing_id", "in": "path", "required": True,
                            "schema": {"type": "string", "format": "uuid"}}],
            "patch": {
                "parameters": [{"name": "n", "in": "query", "schema": {"type": "integer", "maximum": 5}}],
                "requestBody": {"required": True,
                                "content": {JSON: {"schema": {"$ref": "#/components/schemas/T"}}}},
            },
            "trace": {},
        }},
        "components": {"schemas": {"T": {"type": "object", "required": ["a"], "properties": {
            "a": {"type": "integer", "minimum": 1, "maximum": 3},
            "b": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        }}}},
    }
    [op] = operations(document)
    assert (op.method, op.path) == ("PATCH", "/things/{thing_id}")
    assert [p.name for p in op.params] == ["thing_id", "n"]
    schemas = Schemas(document, ["11111111-1111-1111-1111-111111111111"])
    assert op.body is not None
    assert schemas.kinds(op.body[1]) == {"object"}
    assert schemas.kinds({"anyOf": [{"type": "string"}, {"type": "null"}]}) == {"string", "null"}

    @settings(max_examples=50, database=None, derandomize=True, deadline=None)
    @given(value=schemas.valid(op.body[1]), mutated=schemas.mutated(op.body[1]))
    def check(value: dict[str, Any], mutated: Any) -> None:
        assert 1 <= value["a"] <= 3
        assert set(value) <= {"a", "b"}
        assert isinstance(mutated, dict)  # an object stays an object; one of its parts is changed

    check()
