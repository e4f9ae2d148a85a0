"""The log sink of the servers (core/observability/logging.py): lines leave the caller through a
thread queue, none is lost at the end, and the libraries keep quiet at INFO."""

from __future__ import annotations

import gc
import io
import logging
import multiprocessing
import multiprocessing.synchronize
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from loguru import logger

from core.observability.logging import configure_logging, flush_logs


@pytest.fixture
def new_stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], io.StringIO]]:
    """Call it in the test, before ``configure_logging``: pytest puts its own ``sys.stderr`` back
    between a fixture's set-up and the test."""

    def swap() -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    yield swap
    configure_logging(level="WARNING", enqueue=False)  # the sink the rest of the suite expects


def test_a_line_is_written_by_the_writer_thread_not_the_caller(new_stderr: Callable[[], io.StringIO]) -> None:
    stream = new_stderr()
    configure_logging(level="INFO", enqueue=True)
    writers: list[str] = []
    real_write = stream.write

    def write(text: str) -> int:
        writers.append(threading.current_thread().name)
        return real_write(text)

    stream.write = write  # type: ignore[method-assign]
    logger.info("queued line")
    flush_logs()

    assert "queued line" in stream.getvalue()
    assert writers
    assert threading.current_thread().name not in writers


def test_nothing_queued_is_lost_when_the_sink_is_replaced(new_stderr: Callable[[], io.StringIO]) -> None:
    stream = new_stderr()
    configure_logging(level="INFO", enqueue=True)
    for n in range(500):
        logger.info("line {}", n)

    configure_logging(level="INFO", enqueue=True)  # removes the first sink

    assert [line for line in stream.getvalue().splitlines() if " line " in line][-1].endswith("line 499")


def test_after_flush_lines_are_written_at_once(new_stderr: Callable[[], io.StringIO]) -> None:
    stream = new_stderr()
    configure_logging(level="INFO", enqueue=True)
    logger.info("before")
    flush_logs()

    logger.info("after")  # no thread left to wait for: a process ending by a signal keeps it

    assert stream.getvalue().index("before") < stream.getvalue().index("after")


def semaphores() -> set[int]:
    return {id(o) for o in gc.get_objects() if isinstance(o, multiprocessing.synchronize.SemLock)}


def test_the_sink_holds_no_multiprocessing_semaphore(new_stderr: Callable[[], io.StringIO]) -> None:
    """loguru's own ``enqueue`` made 8 named semaphores per sink, which a uvicorn worker ending by
    SIGTERM leaked: "resource_tracker: There appear to be 16 leaked semaphore objects"."""
    new_stderr()
    before = semaphores()

    configure_logging(level="INFO", enqueue=True)
    logger.info("a line")

    assert semaphores() - before == set()
    flush_logs()


@pytest.mark.parametrize(("level", "alembic", "pool"), [
    ("INFO", logging.WARNING, logging.WARNING),
    ("WARNING", logging.WARNING, logging.WARNING),
    ("DEBUG", logging.DEBUG, logging.INFO),
])
def test_alembic_and_the_pool_speak_at_debug_only(new_stderr: Callable[[], io.StringIO], level: str,
                                                  alembic: int, pool: int) -> None:
    new_stderr()
    configure_logging(level=level, enqueue=False)

    assert logging.getLogger("alembic.runtime.migration").getEffectiveLevel() == alembic
    assert logging.getLogger("alembic.runtime.plugins").getEffectiveLevel() == alembic
    assert logging.getLogger("sqlalchemy.pool.impl.AsyncAdaptedQueuePool").getEffectiveLevel() == pool
    assert logging.getLogger("sqlalchemy.engine.Engine").getEffectiveLevel() == logging.WARNING
