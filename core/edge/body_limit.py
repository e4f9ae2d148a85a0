"""A ceiling on request bodies, enforced while the body streams in (pure ASGI).

Without it a client could send any amount of JSON and the app would read all of it into memory
before validation refused it. ``BodyLimitMiddleware`` refuses a body longer than ``max_bytes``
(``ATRIUM_MAX_BODY_BYTES``) with 413 ``payload_too_large``:

- a ``Content-Length`` over the limit is refused before the app runs and before a byte is read;
- a body of unknown length (chunked, or HTTP/2 without a length) is counted as it arrives and
  refused as soon as the count passes the limit: the rest is never pulled.

The refusal carries ``Connection: close`` so the server drops the unread rest instead of draining
it. Everything else passes through untouched, with the server's own ``receive`` and ``send``; the
only cost is one scan of the header list:

- a request without a body (a GET: neither header, RFC 9112 §6.3);
- an HTTP/1 body framed by one ``Content-Length`` within the limit: the server parses by that
  length (RFC 9112 §6.3), so the app cannot receive more bytes than it declares. This is the
  common POST, and it pays no wrapper per message.

Whoever reads the body (FastAPI's handler, the fast path's lean handler, an endpoint calling
``request.body()``) gets ``BodyTooLarge`` from ``receive``. It is an ``HTTPException`` so that the
frameworks re-raise it rather than turning it into a 400, and whatever response the app makes of it
is replaced here by the 413 envelope. Body parameters are read before an endpoint runs and an
exception rolls the request's transaction back, so a refused request writes nothing.
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.edge.error_handlers import envelope

CODE = "payload_too_large"
_HTTP1 = frozenset({"1.0", "1.1"})


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body has passed the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=_message(limit))


def _message(limit: int) -> str:
    return f"The request body exceeds the limit of {limit} bytes."


class BodyLimitMiddleware:
    """Refuses a request body longer than ``max_bytes`` with 413 ``payload_too_large``."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.app = app
        self.max_bytes = max_bytes
        self._limit_digits = str(max_bytes)
        self._body = orjson.dumps(envelope(CODE, _message(max_bytes), {"limit_bytes": max_bytes}))
        self._headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self._body)).encode()),
            (b"connection", b"close"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length: bytes | None = None
            lengths = 0
            chunked = False
            for name, value in scope["headers"]:
                if name == b"content-length":
                    length = value
                    lengths += 1
                elif name == b"transfer-encoding":
                    chunked = True
            if length is not None and self.over(length):
                await self.refuse(send)  # nothing read; the app never runs
                return
            # Counted as it arrives: a chunked body, an odd length (several, or no number) and any
            # body over HTTP/2 or later (it may come with neither header, or longer than declared).
            if chunked or (lengths > 1 or (length is not None and not length.isdigit())) or (
                scope.get("http_version", "1.1") not in _HTTP1
            ):
                await _Guard(self, receive, send).run(scope)
                return
        await self.app(scope, receive, send)

    def over(self, length: bytes) -> bool:
        """Whether a ``Content-Length`` value is over the limit (False when it is no number: then the
        body is counted as it comes; servers refuse such a header anyway)."""
        if not length.isdigit():
            return False
        digits = length.lstrip(b"0")
        # A length of thousands of digits is over any limit; int() would refuse to parse it.
        return len(digits) > len(self._limit_digits) or int(digits or b"0") > self.max_bytes

    async def refuse(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 413, "headers": list(self._headers)})
        await send({"type": "http.response.body", "body": self._body})


class _Guard:
    """One request's byte count and the state of its response."""

    __slots__ = ("app_started", "limits", "receive", "refused", "replied", "send", "total")

    def __init__(self, limits: BodyLimitMiddleware, receive: Receive, send: Send) -> None:
        self.limits = limits
        self.receive = receive
        self.send = send
        self.total = 0
        self.refused = False  # the limit was passed: the answer is 413, whatever the app makes of it
        self.app_started = False  # the app's own response went out before that
        self.replied = False  # our 413 went out

    async def run(self, scope: Scope) -> None:
        try:
            await self.limits.app(scope, self.counting_receive, self.guarded_send)
        except BodyTooLarge:
            if self.app_started:
                raise  # too late to answer; the server closes the connection
        if self.refused and not self.app_started and not self.replied:
            self.replied = True
            await self.limits.refuse(self.send)

    async def counting_receive(self) -> Message:
        if self.refused:
            raise BodyTooLarge(self.limits.max_bytes)
        message = await self.receive()
        if message["type"] == "http.request":
            self.total += len(message.get("body", b""))
            if self.total > self.limits.max_bytes:
                self.refused = True
                raise BodyTooLarge(self.limits.max_bytes)
        return message

    async def guarded_send(self, message: Message) -> None:
        if self.refused and not self.app_started:
            # The app answered the refused body in its own way (a 413 from its exception handlers,
            # a 400): the envelope goes out in its place, once, and the rest of its response is dropped.
            if not self.replied and message["type"] == "http.response.start":
                self.replied = True
                await self.limits.refuse(self.send)
            return
        if message["type"] == "http.response.start":
            self.app_started = True
        await self.send(message)
