"""Types for what a client sends: text and integers that every storage behind the edge accepts.

PostgreSQL refuses a NUL character in text and an integer beyond its column's range; both used to
surface as 500s. Schemas and query parameters of every module take these types instead of bare
``str`` / ``int``, so such input is a 422 ``validation_error`` at the edge and nothing is written.

- ``ONE_LINE``: one line of text, no control character (C0 U+0000-U+001F, DEL, C1 U+0080-U+009F);
  ``MULTI_LINE``: the same, but tab, line feed and carriage return are allowed. Metadata for
  ``Annotated[str, StringConstraints(...), ONE_LINE]``; ``Line`` / ``Paragraph`` are bare ``str``
  with the rule. ``ONE_LINE.filled()``: and not blank, for a required field whose whitespace is
  stripped (``strip_whitespace=True, min_length=1``): the document's ``minLength`` counts the text
  as sent, so a name of spaces alone needs a rule of its own.
- ``Int32`` / ``Int64``: the range of an ``Integer`` / ``BigInteger`` column (PostgreSQL's
  ``integer`` / ``bigint``); a narrower range is ``Field(ge=..., le=...)`` within them.
- ``JSON_INTEGER``: an integer of a JSON body, taken as JSON Schema's ``integer`` is (``30`` and
  ``30.0``, never ``"30"`` nor ``true``): ``Annotated[Int32, Field(ge=1), JSON_INTEGER]``.

The OpenAPI document states the rules (JSON Schema ``pattern``, ``minimum``, ``maximum``) and
pydantic enforces them before any endpoint runs, with a message that says what is wrong.
A lone UTF-16 surrogate (JSON ``"\\ud800"``, which FastAPI's standard-library JSON parser lets through
into a bare ``str``) is refused by every text rule as well.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, cast

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_SURROGATES = r"\ud800-\udfff"
SURROGATE_MESSAGE = "must be valid Unicode text (no lone surrogate U+D800-U+DFFF)"


# What ``strip_whitespace`` (pydantic-core: Unicode's White_Space) takes from either end of a text,
# less the control characters every rule here refuses anyway (tab, line breaks, U+0085).
_STRIPPED = r" \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
BLANK_MESSAGE = "must not be blank (spaces alone)"


def _is_surrogate(char: str) -> bool:
    return "\ud800" <= char <= "\udfff"


class TextRule:
    """Annotation metadata: refuses text holding a character of ``forbidden`` (a regex class) with
    ``message``, and documents the rule as the JSON Schema ``pattern``. Put it after the length
    constraints: ``Annotated[str, StringConstraints(max_length=200), ONE_LINE]``. It checks the text
    as sent, before ``strip_whitespace``: ``"lamp\n"`` is refused as the pattern says, not stripped.

    A lone UTF-16 surrogate (U+D800-U+DFFF) is refused by every rule as well: FastAPI parses request
    bodies with the standard ``json`` module, which turns a JSON ``"\\ud800"`` into such a character,
    and no database driver can encode it. It is left out of the documented ``pattern``: JSON text
    cannot carry one as a character, and an ECMA-262 class of surrogates means something else
    without the ``u`` flag."""

    def __init__(self, forbidden: str, message: str, *, stated: bool = True, filled: bool = False) -> None:
        self.forbidden = forbidden
        self.message = message
        self.stated = stated
        self.is_filled = filled
        self._search = re.compile(f"[{forbidden}{_SURROGATES}]").search
        # Some character that is neither forbidden nor stripped: an explicit class, which means the
        # same in Python and in ECMA-262 (the document's regex dialect), where ``\S`` does not.
        visible = f"[^{forbidden}{_STRIPPED}]"
        self._visible = re.compile(visible).search
        self.pattern = f"^[^{forbidden}]*{visible}[^{forbidden}]*$" if filled else f"^[^{forbidden}]*$"

    def unstated(self) -> TextRule:
        """The same rule, left out of the document: for a ``format`` that already excludes what it
        forbids (an ``email`` holds no control character). A ``pattern`` beside such a format says
        nothing more, and makes clients that generate values from the document (schemathesis) search
        for strings that satisfy both, which is slow."""
        return TextRule(self.forbidden, self.message, stated=False, filled=self.is_filled)

    def filled(self) -> TextRule:
        """The same rule, and the text must hold more than whitespace (what ``strip_whitespace``
        removes): for a required field that is stripped, where ``"   "`` would otherwise meet the
        documented ``minLength: 1`` and then be refused as empty."""
        return TextRule(self.forbidden, self.message, stated=self.stated, filled=True)

    def check(self, value: str) -> str:
        found = self._search(value)
        if found:
            raise ValueError(SURROGATE_MESSAGE if _is_surrogate(found.group()) else self.message)
        if self.is_filled and self._visible(value) is None:
            raise ValueError(BLANK_MESSAGE)
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        # On the text as sent, before the type's own constraints: `strip_whitespace` would otherwise
        # take a trailing line break or tab away first, and accept what the documented pattern refuses.
        return core_schema.no_info_before_validator_function(self._check_sent, handler(source))

    def _check_sent(self, value: Any) -> Any:
        return self.check(value) if isinstance(value, str) else value  # not text: the type refuses it

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        document = handler(schema)
        if self.stated:
            document["pattern"] = self.pattern
        return document


# One line: no control character (C0 U+0000-U+001F, DEL, C1 U+0080-U+009F). The C1 controls are
# never typed on purpose, and one of them (U+0085, NEXT LINE) is a line break that strip_whitespace
# removes while the document's regex dialect does not count it as whitespace.
ONE_LINE = TextRule(r"\x00-\x1f\x7f-\x9f",
                    "must be one line without control characters (U+0000-U+001F, U+007F-U+009F)")
# Text over lines: tab, line feed and carriage return allowed; no other control character.
MULTI_LINE = TextRule(r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f",
                      "must not contain control characters other than tab and line breaks")

# Text of any length, for a parameter that needs no other constraint.
Line = Annotated[str, ONE_LINE]
Paragraph = Annotated[str, MULTI_LINE]


Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class JsonInteger:
    """Annotation metadata, last in an ``int``'s ``Annotated`` (after its range): the integer of a JSON
    body, as JSON Schema's ``integer`` is: a number without a fractional part (``30`` and ``30.0``),
    never a string nor a boolean. The document's ``"type": "integer"`` promises that 30.0 is taken as
    30; pydantic's strict mode alone refuses it, and its lax mode takes ``"30"`` and ``true``."""

    @staticmethod
    def integral(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        inner = handler(source)
        if inner["type"] != "int":
            raise TypeError(f"JSON_INTEGER annotates an int, not {inner['type']}")
        cast("core_schema.IntSchema", inner)["strict"] = True
        return core_schema.no_info_before_validator_function(self.integral, inner)


JSON_INTEGER = JsonInteger()
