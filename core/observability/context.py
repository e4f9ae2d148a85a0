"""The request id of the work in progress, visible to every log line and every job it causes, and
the ids of the current OpenTelemetry span (tracing on)."""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

from opentelemetry import trace

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


def current_ids() -> tuple[str, str] | None:
    """The W3C trace id (32 hex digits) and span id (16) of the current span; None without one.

    The OpenTelemetry API alone (FastAPI imports it anyway): called only when tracing is configured.
    """
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
