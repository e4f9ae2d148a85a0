"""The request id of the work in progress, visible to every log line and every job it causes."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{8,128}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(candidate: str | None) -> str:
    """Keep a caller's id only when it is well-formed, so logs can't be forged or flooded."""
    if candidate and _WELL_FORMED.fullmatch(candidate):
        return candidate
    return new_request_id()
