"""Liveness and readiness: ready means the database, the cache and the broker all answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from loguru import logger

from core.edge.error_handlers import error_response
from core.edge.openapi import errors
from core.edge.routes import FlatRoute

Check = Callable[[], Awaitable[None]]

router = APIRouter(prefix="/health", tags=["health"], route_class=FlatRoute)


@router.get("/live")
async def live() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@router.get("/ready", responses=errors({503: "not_ready"}))  # details.checks names what is down
async def ready(request: Request) -> object:
    """Every backing service answers within its timeout; 503 names the ones that did not."""
    checks: dict[str, Check] = request.app.state.health_checks
    timeout: float = request.app.state.health_timeout
    results = await asyncio.gather(*(_run(name, check, timeout) for name, check in checks.items()))
    report = dict(results)
    if all(r["status"] == "ok" for r in report.values()):
        return {"status": "ok", "checks": report}
    failed = sorted(name for name, r in report.items() if r["status"] != "ok")
    return error_response(
        503, "not_ready", f"Not ready: {', '.join(failed)} unavailable.", {"checks": report},
        headers={"Retry-After": "5"},
    )


async def _run(name: str, check: Check, limit: float) -> tuple[str, dict[str, object]]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), limit)
    except Exception as exc:
        logger.warning("readiness check {} failed: {}", name, type(exc).__name__)
        return name, {"status": "down", "error": type(exc).__name__}
    return name, {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 2)}
