"""``core.edge.types``: the text rules and integer ranges every schema and query parameter uses.

The rules are enforced by pydantic and documented as JSON Schema; the two must agree, so the
documented ``pattern`` is checked against the validator on generated text.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import httpx
import pytest
from fastapi import FastAPI, Query
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, StringConstraints, TypeAdapter, ValidationError

from core.edge.error_handlers import install_error_handlers
from core.edge.types import (
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    MULTI_LINE,
    ONE_LINE,
    SURROGATE_MESSAGE,
    Int32,
    Int64,
    Line,
    Paragraph,
)

LINE = TypeAdapter(Line)
PARAGRAPH = TypeAdapter(Paragraph)
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=5), ONE_LINE]


class Named(BaseModel):
    name: Line


def client_of(app: FastAPI) -> httpx.AsyncClient:
    """A client of ``app`` answering errors as Atrium does (the stock handler echoes the input)."""
    install_error_handlers(app)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


PROPERTY = settings(max_examples=300, deadline=None, database=None, derandomize=True)


def accepts(adapter: TypeAdapter[Any], value: Any) -> bool:
    try:
        adapter.validate_python(value)
    except ValidationError:
        return False
    return True


class TestOneLine:
    @pytest.mark.parametrize("text", ["", "plain", "é ß 漢字 😀", "\u00a0", "a" * 10_000])
    def test_accepts_printable_text(self, text: str) -> None:
        assert LINE.validate_python(text) == text

    @pytest.mark.parametrize("text", ["\x00", "a\x00b", "line\nbreak", "cr\r", "\x1b[31m", "\x7f", "\x1f",
                                      "\t", "\x80", "\x85", "next\x85line", "\x9f"])
    def test_refuses_control_characters(self, text: str) -> None:
        with pytest.raises(ValidationError, match="one line without control characters"):
            LINE.validate_python(text)

    def test_checks_the_text_as_sent_before_stripping(self) -> None:
        adapter = TypeAdapter(Name)
        assert adapter.validate_python("  lamp  ") == "lamp"
        # What the documented pattern refuses is refused, not stripped away first (schemathesis:
        # a name ending in a line break was a 201 although the document forbids it).
        for sent in ("lamp\n", "\tlamp", "la\nmp", "lamp\x1f", "\x00" * 6):
            with pytest.raises(ValidationError, match="one line"):
                adapter.validate_python(sent)


Required = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=8),
                     ONE_LINE.filled()]
REQUIRED = TypeAdapter(Required)
# Every character Python calls whitespace (pydantic strips Unicode's White_Space, the same set less
# U+001C-U+001F), and a few that look like it but are not.
WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()]
LOOKALIKES = ["\ufeff", "\u200b", "\u180e", "\u2060"]


class TestFilled:
    """A required field that is stripped: "   " meets ``minLength: 1`` as sent, but not once stripped
    (schemathesis: a name of U+0085 alone was documented as valid and answered 422)."""

    @pytest.mark.parametrize("text", [" ", "   ", "\u00a0", "\u3000\u2003", " \u2028 "])
    def test_refuses_whitespace_alone(self, text: str) -> None:
        with pytest.raises(ValidationError, match="must not be blank"):
            REQUIRED.validate_python(text)
        assert re.fullmatch(ONE_LINE.filled().pattern, text) is None

    @pytest.mark.parametrize("text", ["a", " lamp ", "\u3000x", "\ufeff", "é"])
    def test_accepts_text_with_something_in_it(self, text: str) -> None:
        assert REQUIRED.validate_python(text) == text.strip(" \u3000")
        assert re.fullmatch(ONE_LINE.filled().pattern, text) is not None

    @pytest.mark.parametrize("char", WHITESPACE + LOOKALIKES, ids=lambda c: f"U+{ord(c):04X}")
    def test_every_whitespace_character_alone_is_refused_by_both_or_by_neither(self, char: str) -> None:
        documented = re.fullmatch(ONE_LINE.filled().pattern, char) is not None
        assert documented is accepts(REQUIRED, char)
        assert documented is (char in LOOKALIKES)

    @PROPERTY
    @given(st.text(st.sampled_from(WHITESPACE + LOOKALIKES) | st.characters(max_codepoint=0x2FF),
                   max_size=10))
    def test_the_pattern_and_the_validator_agree(self, text: str) -> None:
        documented = re.fullmatch(ONE_LINE.filled().pattern, text) is not None and len(text) >= 1
        if len(text) <= 8:  # maxLength counts the text as sent; the server counts it stripped
            assert documented is accepts(REQUIRED, text)
        elif documented:
            assert accepts(REQUIRED, text) is (len(text.strip()) <= 8)


class TestMultiLine:
    @pytest.mark.parametrize("text", ["two\nlines", "windows\r\nlines", "tab\there", ""])
    def test_accepts_lines_and_tabs(self, text: str) -> None:
        assert PARAGRAPH.validate_python(text) == text

    @pytest.mark.parametrize("text", ["\x00", "bell\x07", "\x0b", "\x0c", "\x1b", "\x7f", "a\x00\nb"])
    def test_refuses_other_control_characters(self, text: str) -> None:
        with pytest.raises(ValidationError, match="control characters other than tab and line breaks"):
            PARAGRAPH.validate_python(text)


class TestLoneSurrogates:
    """The standard json module (FastAPI's body parser) turns "\\ud800" into a lone surrogate."""

    @pytest.mark.parametrize("adapter", [LINE, PARAGRAPH], ids=["one line", "multi line"])
    @pytest.mark.parametrize("raw", ['"\\ud800"', '"x\\udfffy"', '"\\udbff"'])
    def test_are_refused_with_their_own_message(self, adapter: TypeAdapter[str], raw: str) -> None:
        with pytest.raises(ValidationError, match=re.escape(SURROGATE_MESSAGE)):
            adapter.validate_python(json.loads(raw))

    def test_a_surrogate_pair_is_one_ordinary_character(self) -> None:
        assert LINE.validate_python(json.loads('"\\ud83d\\ude00"')) == "😀"

    async def test_through_fastapi_a_json_body_with_one_is_422(self) -> None:
        """A bare ``str`` field would take it (pydantic refuses one only under a length constraint)."""
        app = FastAPI()

        @app.post("/")
        async def create(body: Named) -> dict[str, str]:
            return {"name": body.name}

        async with client_of(app) as client:
            json_type = {"content-type": "application/json"}
            refused = await client.post("/", content=b'{"name": "a\\ud800"}', headers=json_type)
            accepted = await client.post("/", content=b'{"name": "a\\u00e9"}', headers=json_type)
        assert refused.status_code == 422
        assert accepted.json() == {"name": "aé"}


class TestDocumentedPattern:
    @PROPERTY
    @given(st.text(st.characters(max_codepoint=0x2FF), max_size=12))
    def test_the_pattern_and_the_validator_agree(self, text: str) -> None:
        for rule, adapter in ((ONE_LINE, LINE), (MULTI_LINE, PARAGRAPH)):
            assert (re.fullmatch(rule.pattern, text) is not None) is accepts(adapter, text)

    def test_the_openapi_document_states_the_rules_and_ranges(self) -> None:
        app = FastAPI()

        @app.get("/")
        async def search(
            q: Annotated[Line | None, Query(max_length=20)] = None,
            n: Annotated[Int64 | None, Query(ge=0)] = None,
        ) -> dict[str, Any]:
            return {"q": q, "n": n}

        document = app.openapi()
        parameters = {p["name"]: p["schema"] for p in document["paths"]["/"]["get"]["parameters"]}
        text = parameters["q"]["anyOf"][0]
        assert text["pattern"] == ONE_LINE.pattern
        assert text["maxLength"] == 20
        number = parameters["n"]["anyOf"][0]
        assert (number["minimum"], number["maximum"]) == (0, INT64_MAX)
        json.dumps(document).encode("ascii")  # the document serialises (no raw surrogate in a pattern)


class TestIntegerRanges:
    @pytest.mark.parametrize(("adapter", "low", "high"), [
        (TypeAdapter(Int32), INT32_MIN, INT32_MAX),
        (TypeAdapter(Int64), INT64_MIN, INT64_MAX),
    ], ids=["int32", "int64"])
    def test_the_column_range_is_inclusive_and_nothing_beyond_passes(
        self, adapter: TypeAdapter[int], low: int, high: int
    ) -> None:
        assert adapter.validate_python(low) == low
        assert adapter.validate_python(high) == high
        for beyond in (low - 1, high + 1, 2**64, 10**30, -(10**30)):
            with pytest.raises(ValidationError):
                adapter.validate_python(beyond)

    def test_the_bounds_are_those_of_integer_and_bigint(self) -> None:
        assert (INT32_MIN, INT32_MAX) == (-2147483648, 2147483647)
        assert (INT64_MIN, INT64_MAX) == (-9223372036854775808, 9223372036854775807)

    async def test_through_fastapi_a_query_parameter_past_bigint_is_422(self) -> None:
        app = FastAPI()

        @app.get("/")
        async def search(n: Annotated[Int64 | None, Query(ge=0)] = None) -> dict[str, int | None]:
            return {"n": n}

        async with client_of(app) as client:
            assert (await client.get("/", params={"n": str(INT64_MAX)})).json() == {"n": INT64_MAX}
            for beyond in (str(2**63), str(2**64), str(10**30), "-1"):
                assert (await client.get("/", params={"n": beyond})).status_code == 422
