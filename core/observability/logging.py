"""Loguru for everything: readable lines in development, JSON lines in production.

Every record carries the request id of the work that produced it and, tracing on, the ids of the
span current when it was logged (``configure_logging(traced=True)``). With ``enqueue=True`` (the
servers) a formatted line goes into an in-process queue and a writer thread writes it, so the
request path never waits on log I/O. That queue is a thread queue, not loguru's own ``enqueue``:
loguru's is built for several processes and holds 8 named multiprocessing semaphores per sink, and
a uvicorn worker ends by re-raising SIGTERM, which skips their cleanup, so every stop of
``atrium serve --workers N`` ended in "resource_tracker: There appear to be 8*N leaked semaphore
objects".
stdlib loggers (uvicorn, SQLAlchemy, dramatiq, alembic) are routed through the same sink. Above
DEBUG, alembic and SQLAlchemy's pool keep to warnings.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import traceback
from typing import Any, TextIO

import orjson
from loguru import logger

from core.observability import access_log
from core.observability.context import current_ids, request_id_var

_DEV_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[request_id]}</cyan> <level>{message}</level>"
)
# Tracing configured: the current span's ids follow the request id (``trace`` is "" without a span).
_DEV_FORMAT_TRACED = _DEV_FORMAT.replace("</cyan> ", "</cyan>{extra[trace]} ", 1)
_OWN_KEYS = ("request_id", "logger", "_json", "trace", "trace_id", "span_id")  # not under "extra"


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


def _patch_traced(record: Any) -> None:
    """``_patch``, and the current span's ids (a patcher runs on the logging thread, in its context)."""
    extra = record["extra"]
    extra["request_id"] = request_id_var.get()
    ids = current_ids()
    if ids is not None:
        extra["trace_id"], extra["span_id"] = ids
        extra["trace"] = f" trace_id={ids[0]} span_id={ids[1]}"


def _json_line(record: Any) -> str:
    """One compact JSON object per line (loguru's own ``serialize`` nests a much larger record)."""
    line: dict[str, Any] = {
        "ts": record["time"].isoformat(),
        "level": record["level"].name,
        "logger": record["extra"].get("logger") or record["name"],
        "msg": record["message"],
        "request_id": record["extra"].get("request_id", "-"),
    }
    if "trace_id" in record["extra"]:
        line["trace_id"] = record["extra"]["trace_id"]
        line["span_id"] = record["extra"]["span_id"]
    line["pid"] = record["process"].id
    extra = {k: v for k, v in record["extra"].items() if k not in _OWN_KEYS}
    if extra:
        line["extra"] = extra
    if record["exception"] is not None:
        exc = record["exception"]
        line["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    record["extra"]["_json"] = orjson.dumps(line, default=str).decode()
    return "{extra[_json]}\n"


class _WriterThread:
    """A loguru sink stream: ``write`` only queues the line; a daemon thread writes it to ``stream``.

    loguru calls ``stop`` when the sink is removed (by the next ``configure_logging`` and at exit),
    which writes what is still queued. ``finish`` does the same for a process that is about to end
    without running ``atexit`` (a uvicorn worker re-raises SIGTERM): later lines are written at once.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # None: stop
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._direct = False  # after ``finish``: no thread, each line written as it comes

    def isatty(self) -> bool:  # loguru colours the text format for a terminal only
        try:
            return bool(self._stream.isatty())
        except (AttributeError, ValueError):
            return False

    def write(self, message: str) -> None:
        if self._direct:
            self._write(str(message))
            return
        if self._pid != os.getpid():  # first line, or a forked child: the thread is not there
            self._start()
        self._lines.put(str(message))  # the text only: the record stays behind

    def _start(self) -> None:
        with self._lock:
            if self._pid != os.getpid():
                if self._pid:  # a forked child: what the parent had queued is the parent's to write
                    self._lines = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
                self._thread.start()
                self._pid = os.getpid()

    def _run(self) -> None:
        while True:
            item = self._lines.get()
            batch: list[str] = []
            stop = False
            while True:  # everything already waiting goes out in one write
                if item is None:
                    stop = True
                else:
                    batch.append(item)
                try:
                    item = self._lines.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._write("".join(batch))
            if stop:
                return

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: these lines are gone
            pass

    def finish(self) -> None:
        """Write what is queued; from now on write each line at once, on the caller's thread."""
        self._direct = True
        self.stop()

    def stop(self) -> None:
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return
        self._lines.put(None)
        if thread is not threading.current_thread():
            thread.join(timeout=5)
        self._thread = None
        self._pid = 0


_writer: _WriterThread | None = None


def flush_logs() -> None:
    """Write every queued log line now, and later ones as they come: for the end of a process that
    may end by a signal, skipping ``atexit`` (uvicorn re-raises SIGTERM after its shutdown)."""
    if _writer is not None:
        _writer.finish()


def configure_logging(level: str = "INFO", json: bool = False, enqueue: bool = True,
                      traced: bool = False) -> None:
    """Install the single sink (and the access log, same stream and format, at INFO and below);
    safe to call more than once (tests build several apps).

    ``traced`` (tracing configured: ``ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT`` set): a line logged while
    a span is current carries its ``trace_id`` and ``span_id`` after the request id. Without it the
    lines, and their cost, are exactly as before.
    """
    global _writer
    logger.remove()  # stops the previous writer thread, once it has written what it holds
    if traced:
        logger.configure(patcher=_patch_traced, extra={"request_id": "-", "trace": ""})
    else:
        logger.configure(patcher=_patch, extra={"request_id": "-"})
    _writer = _WriterThread(sys.stderr) if enqueue else None
    sink: Any = _writer if _writer is not None else sys.stderr
    if json:
        logger.add(sink, level=level, format=_json_line, backtrace=False, diagnose=False)
    else:
        logger.add(sink, level=level, format=_DEV_FORMAT_TRACED if traced else _DEV_FORMAT,
                   backtrace=False, diagnose=False, colorize=None)
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
    access_log.configure(json=json, enabled=logger.level(level.upper()).no <= logger.level("INFO").no,
                         traced=traced)
    # Our middleware writes the access log (core.observability.access_log); uvicorn's would duplicate it.
    logging.getLogger("uvicorn.access").disabled = True
    # SQLAlchemy turns on its (very chatty) mapper and SQL logging when INFO is enabled: SQL echo has
    # its own switch (ATRIUM_DATABASE_ECHO). Its pool ("Pool disposed", "Pool recreating") and
    # alembic ("Context impl ...", "Will assume transactional DDL", "setup plugin ...", for every
    # history it runs) speak at DEBUG only; `atrium migrate` reports the revisions it applied itself.
    debug = std_level <= logging.DEBUG
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("sqlalchemy.pool").setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger("alembic").setLevel(std_level if debug else max(std_level, logging.WARNING))
    logging.getLogger("pika").setLevel(logging.WARNING)
