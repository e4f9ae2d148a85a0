"""Types for what a client sends: text and integers that every storage behind the edge accepts.

PostgreSQL refuses a NUL character in text and an integer beyond its column's range; both used to
surface as 500s. Schemas and query parameters of every module take these types instead of bare
``str`` / ``int``, so such input is a 422 ``validation_error`` at the edge and nothing is written.

- ``ONE_LINE``: one line of text, no C0 control character (U+0000-U+001F) and no DEL;
  ``MULTI_LINE``: the same, but tab, line feed and carriage return are allowed. Metadata for
  ``Annotated[str, StringConstraints(...), ONE_LINE]``; ``Line`` / ``Paragraph`` are bare ``str``
  with the rule.
- ``Int32`` / ``Int64``: the range of an ``Integer`` / ``BigInteger`` column (PostgreSQL's
  ``integer`` / ``bigint``); a narrower range is ``Field(ge=..., le=...)`` within them.

The OpenAPI document states the rules (JSON Schema ``pattern``, ``minimum``, ``maximum``) and
pydantic enforces them before any endpoint runs, with a message that says what is wrong. A lone
UTF-16 surrogate (JSON ``"\ud800"``) is already refused by pydantic's JSON parser.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

class TextRule:
    """Annotation metadata: refuses text holding a character of ``forbidden`` (a regex class) with
    ``message``, and documents the rule as the JSON Schema ``pattern``. Put it after the length
    constraints: ``Annotated[str, StringConstraints(max_length=200), ONE_LINE]``."""

    def __init__(self, forbidden: str, message: str) -> None:
        self.pattern = f"^[^{forbidden}]*$"
        self.message = message
        self._search = re.compile(f"[{forbidden}]").search

    def check(self, value: str) -> str:
        if self._search(value):
            raise ValueError(self.message)
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        document = handler(schema)
        document["pattern"] = self.pattern
        return document


# One line: no C0 control character (U+0000-U+001F) and no DEL.
ONE_LINE = TextRule(r"\x00-\x1f\x7f", "must be one line without control characters (U+0000-U+001F, U+007F)")
# Text over lines: tab, line feed and carriage return allowed; no other control character.
MULTI_LINE = TextRule(r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f",
                      "must not contain control characters other than tab and line breaks")

# Text of any length, for a parameter that needs no other constraint.
Line = Annotated[str, ONE_LINE]
Paragraph = Annotated[str, MULTI_LINE]


Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
