"""Every failure leaves the API in one envelope: ``{"error": {"code", "message", "details"}}``.

The handlers turn ``AppError`` (and subclasses), FastAPI's validation errors, Starlette's HTTP
errors and integrity conflicts into that envelope. Unexpected exceptions are caught by
``ErrorMiddleware`` (pure ASGI, innermost of ours) so they are logged with the request id and
answered 500 with nothing internal leaked; database and broker outages become 503.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from loguru import logger
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.db.engine import database_unavailable
from core.edge.errors import AppError


def envelope(code: str, message: str, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": dict(details or {})}}


def error_response(
    status: int, code: str, message: str, details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    return Response(
        orjson.dumps(envelope(code, message, details)),
        status_code=status,
        media_type="application/json",
        headers=dict(headers or {}),
    )


async def _app_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(400, "invalid_json", "The request body is not valid JSON.")
    # ``input`` is left out on purpose: it would echo passwords and tokens back.
    fields = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors
    ]
    return error_response(422, "validation_error", "The request is invalid.", {"errors": fields})


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (204, 304) or exc.status_code < 400:
        return Response(status_code=exc.status_code, headers=exc.headers)
    code = _HTTP_CODES.get(exc.status_code, HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_"))
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and message == "Not Found":
        message = "The requested resource does not exist."
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _integrity_error(_: Request, exc: Exception) -> Response:
    # A constraint the service did not anticipate (e.g. two requests racing past a pre-check).
    logger.warning("integrity error answered 409: {}", type(exc.__cause__ or exc).__name__)
    return error_response(409, "conflict", "The request conflicts with the current state of the resource.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(IntegrityError, _integrity_error)


def is_unavailable(exc: BaseException) -> bool:
    """True for failures of a server we depend on (database down, pool exhausted, network)."""
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, OperationalError | PoolTimeout | ConnectionError | TimeoutError | OSError):
        return True
    # e.g. "the database system is starting up / shutting down" while PostgreSQL restarts: asyncpg's
    # SQLSTATE 57P03 arrives as a plain DBAPIError, not flagged as a lost connection.
    return database_unavailable(exc)


class ErrorMiddleware:
    """Last line of defence: anything unhandled becomes a logged 500 (or 503) envelope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if is_unavailable(exc):
                logger.opt(exception=exc).error("dependency unavailable: {}", type(exc).__name__)
                response = error_response(
                    503, "service_unavailable", "A backing service is unavailable; retry shortly.",
                    headers={"Retry-After": "1"},
                )
            else:
                logger.opt(exception=exc).error("unhandled error on {} {}", scope["method"], scope["path"])
                response = error_response(500, "internal_error", "An unexpected error occurred.")
            if started:
                raise  # too late to answer; let the server close the connection
            await response(scope, receive, send)
