"""The request id of the work in progress, visible to every log line and every job it causes."""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{8,128}")


def new_request_id() -> str:
    """32 random hex digits (uuid4().hex's shape at a tenth of its cost: no UUID object)."""
    return os.urandom(16).hex()


def accept_request_id(candidate: str | None) -> str:
    """Keep a caller's id only when it is well-formed, so logs can't be forged or flooded."""
    if candidate and _WELL_FORMED.fullmatch(candidate):
        return candidate
    return new_request_id()
