"""Loguru for everything: readable lines in development, JSON lines in production.

Every record carries the request id of the work that produced it. The sink is ``enqueue=True``:
records go through a queue to a writer thread, so the request path never waits on log I/O.
stdlib loggers (uvicorn, SQLAlchemy, dramatiq, alembic) are routed through the same sink.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import orjson
from loguru import logger

from core.observability import access_log
from core.observability.context import request_id_var

_DEV_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[request_id]}</cyan> <level>{message}</level>"
)


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(logger=record.name).opt(depth=6, exception=record.exc_info).log(
            level, record.getMessage()
        )


def _patch(record: Any) -> None:
    record["extra"]["request_id"] = request_id_var.get()


def _json_line(record: Any) -> str:
    """One compact JSON object per line (loguru's own ``serialize`` nests a much larger record)."""
    line: dict[str, Any] = {
        "ts": record["time"].isoformat(),
        "level": record["level"].name,
        "logger": record["extra"].get("logger") or record["name"],
        "msg": record["message"],
        "request_id": record["extra"].get("request_id", "-"),
        "pid": record["process"].id,
    }
    extra = {k: v for k, v in record["extra"].items() if k not in ("request_id", "logger", "_json")}
    if extra:
        line["extra"] = extra
    if record["exception"] is not None:
        exc = record["exception"]
        line["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    record["extra"]["_json"] = orjson.dumps(line, default=str).decode()
    return "{extra[_json]}\n"


def configure_logging(level: str = "INFO", json: bool = False, enqueue: bool = True) -> None:
    """Install the single sink (and the access log, same stream and format, at INFO and below);
    safe to call more than once (tests build several apps)."""
    logger.remove()
    logger.configure(patcher=_patch, extra={"request_id": "-"})
    if json:
        logger.add(sys.stderr, level=level, format=_json_line, enqueue=enqueue, backtrace=False,
                   diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=_DEV_FORMAT, enqueue=enqueue, backtrace=False,
                   diagnose=False, colorize=None)
    # The stdlib levels must match ours: a root level of 0 would make uvicorn believe TRACE is
    # on and wrap every connection in its message logger (a tenth of the request cost).
    std_level = logging.getLevelName(level) if isinstance(logging.getLevelName(level), int) else logging.INFO
    logging.basicConfig(handlers=[_InterceptHandler()], level=std_level, force=True)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "sqlalchemy", "dramatiq", "alembic",
                 "pika", "asyncio"):
        std = logging.getLogger(name)
        std.handlers = [_InterceptHandler()]
        std.propagate = False
        std.setLevel(std_level)
    access_log.configure(json=json, enabled=logger.level(level.upper()).no <= logger.level("INFO").no)
    # Our middleware writes the access log (core.observability.access_log); uvicorn's would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True
    # SQLAlchemy turns on its (very chatty) mapper and pool logging when INFO is enabled; SQL
    # echo has its own switch (ATRIUM_DATABASE_ECHO).
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("pika").setLevel(logging.WARNING)
