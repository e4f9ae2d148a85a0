"""Errors the client can act on; each maps to a status and a stable ``code``.

Pure Python on purpose: a module's domain raises these without importing any web framework.
``core.edge.error_handlers`` turns them (and every other failure) into the response envelope.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class AppError(Exception):
    """An error the client can act on. Subclasses fix ``status`` and ``code``."""

    status: int = 400
    code: str = "bad_request"
    headers: Mapping[str, str] | None = None

    def __init__(self, message: str, *, code: str | None = None, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = dict(details or {})


class BadRequest(AppError):
    status, code = 400, "bad_request"


class Unauthorized(AppError):
    status, code = 401, "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(AppError):
    status, code = 403, "forbidden"


class NotFound(AppError):
    status, code = 404, "not_found"


class Conflict(AppError):
    status, code = 409, "conflict"


class Unprocessable(AppError):
    status, code = 422, "validation_error"


class ServiceUnavailable(AppError):
    status, code = 503, "service_unavailable"
