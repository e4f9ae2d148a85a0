"""Request ids and the last-resort error envelope, driven as raw ASGI (no FastAPI, no server)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import sqlalchemy.exc
from loguru import logger
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.edge.error_handlers import ErrorMiddleware
from core.edge.middleware import RequestContextMiddleware
from core.observability import access_log
from core.observability.context import accept_request_id, new_request_id, request_id_var
from core.observability.logging import configure_logging

GENERATED = re.compile(r"^[0-9a-f]{32}$")


# --- accept_request_id --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good",
    [
        "abcdefgh",  # the shortest accepted (8)
        "a" * 128,  # the longest accepted
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "req.2025-01-01T12:00:00Z",
        "trace_id:span_id:ABC-123",
    ],
)
def test_well_formed_ids_are_kept(good: str) -> None:
    assert accept_request_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("abcdefg", id="too-short"),
        pytest.param("a" * 129, id="too-long"),
        pytest.param("abcd efgh", id="space"),
        pytest.param("abcd\nefgh", id="newline-inside"),
        pytest.param("\nabcdefgh", id="newline-leading"),
        pytest.param("abcd\refgh", id="carriage-return"),
        pytest.param("abcdéfghij", id="unicode-letter"),
        pytest.param("١٢٣٤٥٦٧٨٩", id="unicode-digits"),
        pytest.param("abcdefgh\u2028", id="unicode-line-separator"),
        pytest.param("abcd<script>", id="markup"),
        pytest.param("abcd=efgh", id="equals"),
        pytest.param("", id="empty"),
        pytest.param(None, id="absent"),
    ],
)
def test_malformed_ids_are_replaced_by_a_fresh_one(bad: str | None) -> None:
    replaced = accept_request_id(bad)

    assert replaced != bad
    assert GENERATED.match(replaced)


def test_a_trailing_newline_is_not_accepted() -> None:
    assert accept_request_id("abcdefgh\n") != "abcdefgh\n"


def test_generated_ids_are_unique() -> None:
    ids = {new_request_id() for _ in range(1000)}

    assert len(ids) == 1000
    assert all(GENERATED.match(i) for i in ids)


# --- a raw ASGI harness ---------------------------------------------------------------------------


class Result:
    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        start = next(m for m in messages if m["type"] == "http.response.start")
        self.status: int = start["status"]
        self.raw_headers: list[tuple[bytes, bytes]] = list(start.get("headers", []))
        self.body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self.raw_headers if k.lower() == key]

    def json(self) -> Any:
        return json.loads(self.body)


def http_scope(path: str = "/things", headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers or [], "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }


async def call(app: ASGIApp, headers: list[tuple[bytes, bytes]] | None = None) -> Result:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(http_scope(headers=headers), receive, send)
    return Result(sent)


def stack(app: ASGIApp) -> ASGIApp:
    """The order main.create_app uses: RequestContext outside, ErrorMiddleware inside."""
    return RequestContextMiddleware(ErrorMiddleware(app))


Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


def answering(status: int = 200, body: bytes = b'{"ok":true}', before: Callable[[], None] | None = None
              ) -> Handler:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if before is not None:
            before()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


def raising(exc: BaseException) -> Handler:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


# --- RequestContextMiddleware ---------------------------------------------------------------------


async def test_a_well_formed_request_id_is_echoed() -> None:
    result = await call(stack(answering()), [(b"x-request-id", b"client-id-12345")])

    assert result.status == 200
    assert result.all("x-request-id") == ["client-id-12345"]
    assert result.header("content-type") == "application/json"
    assert result.json() == {"ok": True}


async def test_a_request_id_is_generated_when_absent() -> None:
    first = await call(stack(answering()))
    second = await call(stack(answering()))

    assert GENERATED.match(first.header("x-request-id") or "")
    assert first.header("x-request-id") != second.header("x-request-id")


async def test_a_malformed_request_id_is_replaced() -> None:
    result = await call(stack(answering()), [(b"x-request-id", b"bad id with spaces")])

    assert GENERATED.match(result.header("x-request-id") or "")


async def test_a_request_id_with_a_trailing_newline_is_not_echoed() -> None:
    result = await call(stack(answering()), [(b"x-request-id", b"abcdefgh\n")])

    assert "\n" not in (result.header("x-request-id") or "")


async def test_the_request_id_is_set_during_the_call_and_reset_after() -> None:
    seen: list[str] = []
    result = await call(stack(answering(before=lambda: seen.append(request_id_var.get()))),
                        [(b"x-request-id", b"during-the-call-1")])

    assert seen == ["during-the-call-1"]
    assert result.header("x-request-id") == "during-the-call-1"
    assert request_id_var.get() == "-"


async def test_a_generated_request_id_is_the_one_seen_by_the_app() -> None:
    seen: list[str] = []
    result = await call(stack(answering(before=lambda: seen.append(request_id_var.get()))))

    assert seen == [result.header("x-request-id")]


async def test_non_http_scopes_pass_through_untouched() -> None:
    calls: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope)
        assert request_id_var.get() == "-"

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    await stack(app)(scope, receive, send)

    assert calls == [scope]


# --- ErrorMiddleware --------------------------------------------------------------------------------


async def test_an_unhandled_error_is_a_500_envelope_without_internals() -> None:
    app = raising(RuntimeError("password=hunter2 at /srv/secret.py line 42"))

    result = await call(stack(app), [(b"x-request-id", b"failing-request-1")])

    assert result.status == 500
    assert result.header("content-type") == "application/json"
    assert result.json() == {"error": {"code": "internal_error", "message": "An unexpected error occurred.",
                                       "details": {}}}
    assert b"hunter2" not in result.body
    assert b"RuntimeError" not in result.body
    assert result.header("x-request-id") == "failing-request-1"


async def test_a_database_outage_is_a_503_with_retry_after() -> None:
    app = raising(sqlalchemy.exc.OperationalError("x", {}, Exception()))

    result = await call(stack(app))

    assert result.status == 503
    assert result.json()["error"]["code"] == "service_unavailable"
    assert set(result.json()["error"]) == {"code", "message", "details"}
    assert result.header("retry-after") == "1"
    assert GENERATED.match(result.header("x-request-id") or "")


@pytest.mark.parametrize(
    "exc",
    [
        pytest.param(sqlalchemy.exc.TimeoutError("pool exhausted"), id="pool-timeout"),
        pytest.param(ConnectionRefusedError("redis down"), id="connection-refused"),
        pytest.param(TimeoutError(), id="timeout"),
    ],
)
async def test_other_backing_service_failures_are_503(exc: Exception) -> None:
    result = await call(stack(raising(exc)))

    assert result.status == 503
    assert result.json()["error"]["code"] == "service_unavailable"


async def test_an_integrity_error_that_escapes_is_a_500_not_a_503() -> None:
    exc = sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed: users.email"))

    result = await call(stack(raising(exc)))

    assert result.status == 500
    assert b"users.email" not in result.body


async def test_an_error_after_the_response_started_is_reraised() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom mid-stream")

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="boom mid-stream"):
        await stack(app)(http_scope(), receive, send)

    assert [m["type"] for m in sent] == ["http.response.start"]  # no second response was started


# --- every log line carries the request id ------------------------------------------------------

ACCESS_LINE = r"^\d\d:\d\d:\d\d\.\d{3} INFO    %s GET /things %d \d+\.\dms$"


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    configure_logging(level="DEBUG", enqueue=False)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="DEBUG",
                      format="{extra[request_id]}|{message}", colorize=False, backtrace=False,
                      diagnose=False)
    try:
        yield lines
    finally:
        logger.remove(sink)
        configure_logging(level="WARNING", enqueue=False)


@pytest.fixture
def access_lines(log_lines: list[str]) -> Callable[[], list[str]]:
    """The access log's lines (``core.observability.access_log``, not loguru), read after a flush."""
    stream = io.StringIO()
    log = access_log.configure(json=False, enabled=True, stream=lambda: stream)

    def read() -> list[str]:
        log.flush()
        return stream.getvalue().splitlines()

    return read


async def test_every_log_line_of_a_request_carries_its_id(
    log_lines: list[str], access_lines: Callable[[], list[str]]
) -> None:
    def chatty() -> None:
        logger.info("handling the request")
        logging.getLogger("sqlalchemy").warning("a stdlib record routed through loguru")

    await call(stack(answering(before=chatty)), [(b"x-request-id", b"logged-request-1")])
    logger.info("after the request")

    during, after = log_lines[:-1], log_lines[-1]
    assert len(during) == 2  # the app's line and the stdlib line; the access line is not loguru's
    assert all(line.startswith("logged-request-1|") for line in during), during
    assert any("handling the request" in line for line in during)
    assert any("a stdlib record routed through loguru" in line for line in during)
    assert not any("GET /things" in line for line in log_lines)
    assert after == "-|after the request"
    [access] = access_lines()
    assert re.match(ACCESS_LINE % ("logged-request-1", 200), access), access


async def test_the_error_log_line_carries_the_request_id(
    log_lines: list[str], access_lines: Callable[[], list[str]]
) -> None:
    await call(stack(raising(RuntimeError("kaput"))), [(b"x-request-id", b"logged-failure-1")])

    assert log_lines, "nothing was logged"
    assert all(line.startswith("logged-failure-1|") for line in log_lines), log_lines
    assert any("unhandled error on GET /things" in line for line in log_lines)
    [access] = access_lines()
    assert re.match(ACCESS_LINE % ("logged-failure-1", 500), access), access
