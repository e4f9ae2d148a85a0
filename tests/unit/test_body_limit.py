"""``BodyLimitMiddleware``: a body over the limit is 413 ``payload_too_large``, refused before it is read.

Driven as raw ASGI (an app that reads the body as Starlette does, a receive that counts what was
pulled), then through the real app with the fast path on and off (their handlers read the body
themselves).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.types import Message, Receive, Scope, Send

from core.edge.body_limit import BodyLimitMiddleware, BodyTooLarge
from main import create_app
from tests.support.envelope import assert_envelope
from tests.support.settings import make_settings
from tests.support.stack import serve

LIMIT = 100


class Source:
    """An ASGI ``receive`` over ``chunks`` that records how many were pulled."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = list(chunks)
        self.pulled = 0

    async def __call__(self) -> Message:
        if self.pulled < len(self.chunks):
            self.pulled += 1
            return {"type": "http.request", "body": self.chunks[self.pulled - 1],
                    "more_body": self.pulled < len(self.chunks)}
        return {"type": "http.disconnect"}


class Sink:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


class EchoApp:
    """Reads the whole body as Starlette's ``Request`` does and answers its length."""

    def __init__(self) -> None:
        self.calls = 0
        self.receive: Receive | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        self.receive = receive
        if scope["type"] != "http":
            return
        body = await Request(scope, receive).body()
        await JSONResponse({"length": len(body)})(scope, receive, send)


def http_scope(headers: dict[str, str], method: str = "POST", http_version: str = "1.1") -> Scope:
    return {"type": "http", "http_version": http_version, "method": method, "path": "/", "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


async def call(app: Any, scope: Scope, source: Source) -> Sink:
    sink = Sink()
    await BodyLimitMiddleware(app, max_bytes=LIMIT)(scope, source, sink)
    return sink


def assert_refused(sink: Sink) -> None:
    assert sink.status == 413
    assert sink.headers[b"content-type"] == b"application/json"
    assert sink.headers[b"connection"] == b"close"
    assert int(sink.headers[b"content-length"]) == len(sink.body)
    error = json.loads(sink.body)["error"]
    assert error["code"] == "payload_too_large"
    assert error["details"] == {"limit_bytes": LIMIT}
    assert str(LIMIT) in error["message"]


class TestContentLength:
    async def test_over_the_limit_is_refused_before_anything_is_read(self) -> None:
        app, source = EchoApp(), Source([b"x" * 60, b"x" * 60])

        sink = await call(app, http_scope({"Content-Length": str(LIMIT + 1)}), source)

        assert_refused(sink)
        assert source.pulled == 0
        assert app.calls == 0

    async def test_exactly_at_the_limit_passes(self) -> None:
        app, source = EchoApp(), Source([b"x" * 40, b"x" * 60])

        sink = await call(app, http_scope({"Content-Length": str(LIMIT)}), source)

        assert sink.status == 200
        assert json.loads(sink.body) == {"length": LIMIT}

    async def test_a_length_of_thousands_of_digits_is_refused_not_a_crash(self) -> None:
        app, source = EchoApp(), Source([b"x"])

        sink = await call(app, http_scope({"Content-Length": "9" * 5000}), source)

        assert_refused(sink)
        assert source.pulled == 0

    async def test_leading_zeros_are_read_as_the_number(self) -> None:
        app = EchoApp()

        scope = http_scope({"Content-Length": "000000000000000000000010"})

        sink = await call(app, scope, Source([b"x" * 10]))

        assert sink.status == 200

    async def test_an_http1_body_framed_by_its_length_passes_with_the_servers_own_receive(self) -> None:
        """The server parses an HTTP/1 body by its Content-Length: nothing to count, nothing wrapped."""
        app, source = EchoApp(), Source([b"x" * 40])

        sink = await call(app, http_scope({"Content-Length": "40"}), source)

        assert sink.status == 200
        assert json.loads(sink.body) == {"length": 40}
        assert app.receive is source

    async def test_an_http2_body_longer_than_its_declared_length_is_still_counted(self) -> None:
        app, source = EchoApp(), Source([b"x" * 60] * 5)

        sink = await call(app, http_scope({"Content-Length": "10"}, http_version="2"), source)

        assert_refused(sink)
        assert source.pulled == 2

    async def test_several_lengths_leave_the_body_counted(self) -> None:
        app, source = EchoApp(), Source([b"x" * 60] * 5)
        scope = http_scope({})
        scope["headers"] = [(b"content-length", b"10"), (b"content-length", b"10")]

        sink = await call(app, scope, source)

        assert_refused(sink)
        assert source.pulled == 2

    async def test_a_length_beside_chunked_framing_leaves_the_body_counted(self) -> None:
        app, source = EchoApp(), Source([b"x" * 60] * 5)

        sink = await call(app, http_scope({"Content-Length": "10", "Transfer-Encoding": "chunked"}), source)

        assert_refused(sink)
        assert source.pulled == 2

    async def test_a_length_that_is_no_number_leaves_the_body_counted(self) -> None:
        app, source = EchoApp(), Source([b"x" * 60] * 5)

        sink = await call(app, http_scope({"Content-Length": "lots"}), source)

        assert_refused(sink)
        assert source.pulled == 2


class TestChunked:
    async def test_over_the_limit_is_refused_as_soon_as_the_count_passes_it(self) -> None:
        app, source = EchoApp(), Source([b"x" * 30] * 1000)  # 30 kB in chunks of 30 bytes

        sink = await call(app, http_scope({"Transfer-Encoding": "chunked"}), source)

        assert_refused(sink)
        assert source.pulled == 4  # 120 > 100 after the fourth chunk; the rest never pulled
        assert app.calls == 1

    async def test_exactly_at_the_limit_passes(self) -> None:
        app = EchoApp()

        source = Source([b"x" * 50, b"x" * 50, b""])

        sink = await call(app, http_scope({"Transfer-Encoding": "chunked"}), source)

        assert sink.status == 200
        assert json.loads(sink.body) == {"length": LIMIT}

    async def test_one_byte_over_is_refused(self) -> None:
        sink = await call(EchoApp(), http_scope({"Transfer-Encoding": "chunked"}),
                          Source([b"x" * 50, b"x" * 51]))

        assert_refused(sink)

    async def test_an_http2_body_without_a_length_is_counted(self) -> None:
        source = Source([b"x" * 60] * 3)

        sink = await call(EchoApp(), http_scope({}, http_version="2"), source)

        assert_refused(sink)
        assert source.pulled == 2


class TestNoBody:
    async def test_a_get_passes_with_its_own_receive(self) -> None:
        """No framing header: nothing to count, so the app gets the server's ``receive`` unwrapped."""
        app, source = EchoApp(), Source([b""])

        sink = await call(app, http_scope({"Accept": "*/*"}, method="GET"), source)

        assert sink.status == 200
        assert json.loads(sink.body) == {"length": 0}
        assert app.receive is source

    async def test_other_scopes_pass_untouched(self) -> None:
        app, source = EchoApp(), Source([])

        await BodyLimitMiddleware(app, max_bytes=LIMIT)({"type": "lifespan"}, source, Sink())

        assert app.calls == 1
        assert app.receive is source

    def test_the_limit_is_at_least_one_byte(self) -> None:
        with pytest.raises(ValueError, match="at least 1"):
            BodyLimitMiddleware(EchoApp(), max_bytes=0)


class TestWhateverTheAppMakesOfIt:
    async def test_an_app_that_answers_the_error_itself_is_overruled(self) -> None:
        """FastAPI's handlers render the exception (or would make a 400 of a broken body): the
        answer is still the 413 envelope, sent once."""

        async def swallowing(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await Request(scope, receive).body()
            except Exception:
                await PlainTextResponse("There was an error parsing the body", status_code=400)(
                    scope, receive, send)

        source = Source([b"x" * 60] * 3)
        sink = await call(swallowing, http_scope({"Transfer-Encoding": "chunked"}), source)

        assert_refused(sink)
        assert [m["type"] for m in sink.messages] == ["http.response.start", "http.response.body"]

    async def test_a_response_already_started_is_left_alone(self) -> None:
        """An app that answered before reading all of the body: too late for a 413."""

        async def early(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await Request(scope, receive).body()

        sink = Sink()
        with pytest.raises(BodyTooLarge):
            await BodyLimitMiddleware(early, max_bytes=LIMIT)(
                http_scope({"Transfer-Encoding": "chunked"}), Source([b"x" * 60] * 3), sink)

        assert sink.status == 200
        assert len(sink.messages) == 1


# --- through the app: both request handlers ------------------------------------------------------

APP_LIMIT = 2048


@pytest.fixture(scope="module", params=["on", "off"])
async def app_client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                     ) -> AsyncIterator[httpx.AsyncClient]:
    path: Path = tmp_path_factory.mktemp("body-limit") / "app.db"
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{path}", fast_path=request.param,
                             max_body_bytes=APP_LIMIT)
    app = create_app(settings)
    assert app.state.container.fast_path() or request.param == "off"
    async with serve(app) as client:
        yield client


async def stream(chunks: int, size: int, pulled: list[int]) -> AsyncIterator[bytes]:
    for _ in range(chunks):
        pulled.append(size)
        yield b" " * size


class TestThroughTheApp:
    async def test_a_declared_length_over_the_limit_is_413_with_the_request_id(
        self, app_client: httpx.AsyncClient
    ) -> None:
        pulled: list[int] = []
        response = await app_client.post("/api/v1/items", content=stream(100, 1024, pulled),
                                         headers={"Content-Length": str(100 * 1024),
                                                  "Content-Type": "application/json"})

        error = assert_envelope(response, 413, "payload_too_large")
        assert error["details"] == {"limit_bytes": APP_LIMIT}
        assert response.headers["x-request-id"]
        assert pulled == []

    @pytest.mark.parametrize("path", ["/api/v1/items", "/api/v1/users", "/api/v1/auth/token",
                                      "/api/v1/webhooks/payment-gateway"])
    async def test_a_chunked_body_is_refused_after_the_limit_whatever_reads_it(
        self, app_client: httpx.AsyncClient, path: str
    ) -> None:
        """JSON bodies (lean or FastAPI handler), a form (the token endpoint), an endpoint that reads
        the raw body itself (the webhook): each stops pulling just past the limit."""
        pulled: list[int] = []
        content_type = "application/x-www-form-urlencoded" if path.endswith("token") else "application/json"
        response = await app_client.post(path, content=stream(1000, 1024, pulled),
                                         headers={"Content-Type": content_type})

        assert_envelope(response, 413, "payload_too_large")
        assert sum(pulled) == APP_LIMIT + 1024  # the chunk that passed the limit, and not one more

    async def test_a_body_at_the_limit_reaches_validation(self, app_client: httpx.AsyncClient) -> None:
        body = json.dumps({"email": "x@example.com", "password": "p" * 10, "full_name": "n", "age": 7})
        padded = body + " " * (APP_LIMIT - len(body))

        response = await app_client.post("/api/v1/users", content=padded,
                                         headers={"Content-Type": "application/json"})

        assert_envelope(response, 422, "validation_error")  # age under 18: read and validated

    async def test_a_get_is_untouched(self, app_client: httpx.AsyncClient) -> None:
        assert (await app_client.get("/api/v1/items")).status_code == 200
