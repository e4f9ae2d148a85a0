"""Pure ASGI middleware: request id and access log.

Written against the raw ASGI interface rather than ``BaseHTTPMiddleware``, which wraps every
response body in an extra task and stream and costs a large share of throughput. The access line
is handed to ``core.observability.access_log``, which formats and writes it off the request path.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.observability.access_log import access_log
from core.observability.context import accept_request_id, request_id_var

REQUEST_ID_HEADER = b"x-request-id"


class RequestContextMiddleware:
    """Sets the request id (accepted from ``X-Request-ID`` when well-formed), echoes it, logs access."""

    def __init__(self, app: ASGIApp, *, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                incoming = value.decode("latin-1")
                break
        request_id = accept_request_id(incoming)
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        header = (REQUEST_ID_HEADER, request_id.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log:
                log = access_log()
                if log.enabled:
                    log.record(scope["method"], scope["path"], status,
                               (time.perf_counter() - started) * 1000, request_id)
            request_id_var.reset(token)
