"""The access log: lines recorded on the request path, written in order by a thread of its own."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import pytest
from starlette.types import Message, Receive, Scope, Send

from core.edge.middleware import RequestContextMiddleware
from core.observability import access_log as access_log_module
from core.observability.access_log import AccessLog, access_log
from core.observability.logging import configure_logging

TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} INFO    (\S+) (\S+) (\S+) (\d+) (\d+\.\d)ms$")
DROPPED = re.compile(r"access log: (\d+) line\(s\) dropped")

MakeLog = Callable[..., AccessLog]


@pytest.fixture
def make_log() -> Iterator[MakeLog]:
    """Builds access logs writing to a stream of the test's; every one is closed afterwards."""
    made: list[AccessLog] = []

    def make(stream: TextIO | Callable[[], TextIO], **options: Any) -> AccessLog:
        source = stream if callable(stream) else (lambda: stream)
        log = AccessLog(source, **options)
        made.append(log)
        return log

    yield make
    for log in made:
        log.close()


def wait_for(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "not written in time"
        time.sleep(0.01)


def in_threads(count: int, work: Callable[[int], None]) -> None:
    """``work(t)`` for t in 0..count-1, each in its own thread; returns when all have finished."""
    workers = [threading.Thread(target=work, args=(t,)) for t in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def lines_of(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def paths_of(lines: list[str]) -> list[str]:
    return [m.group(3) for line in lines if (m := TEXT_LINE.match(line))]


# --- writing ---------------------------------------------------------------------------------------


def test_a_recorded_line_is_written_on_flush(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=60)

    log.record("GET", "/p", 200, 1.25, "req-1")

    assert log.flush() == 1
    assert len(lines_of(stream)) == 1
    match = TEXT_LINE.match(lines_of(stream)[0])
    assert match is not None, lines_of(stream)
    assert match.groups() == ("req-1", "GET", "/p", "200", "1.2")
    assert log.flush() == 0  # nothing is written twice
    assert len(lines_of(stream)) == 1


def test_lines_are_written_within_the_interval_without_a_flush(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=0.05)
    started = time.monotonic()

    log.record("GET", "/soon", 204, 0.5, "req-2")

    wait_for(lambda: bool(stream.getvalue()), within=2.0)
    assert time.monotonic() - started < 1.0
    assert paths_of(lines_of(stream)) == ["/soon"]


def test_a_full_batch_is_written_before_the_interval(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=60, batch=3)

    for i in range(3):
        log.record("GET", f"/b{i}", 200, 1.0, "req")

    wait_for(lambda: len(lines_of(stream)) == 3, within=2.0)
    assert paths_of(lines_of(stream)) == ["/b0", "/b1", "/b2"]


def test_lines_keep_their_order_across_writes(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=0.01, batch=7)

    for i in range(2_000):
        log.record("GET", f"/{i}", 200, 1.0, "req")
        if i % 500 == 0:
            log.flush()  # explicit flushes interleave with the thread's
    log.close()

    assert paths_of(lines_of(stream)) == [f"/{i}" for i in range(2_000)]


def test_close_writes_what_is_left_without_waiting_for_the_interval(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=60)
    for i in range(5):
        log.record("POST", f"/left/{i}", 201, 3.0, "req")

    started = time.monotonic()
    log.close()

    assert time.monotonic() - started < 2.0
    assert paths_of(lines_of(stream)) == [f"/left/{i}" for i in range(5)]


def test_lines_recorded_after_close_are_still_written(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=0.05)
    log.record("GET", "/before", 200, 1.0, "req")
    log.close()

    log.record("GET", "/after", 200, 1.0, "req")

    wait_for(lambda: len(lines_of(stream)) == 2, within=2.0)
    assert paths_of(lines_of(stream)) == ["/before", "/after"]


def test_the_stream_is_asked_for_at_each_write(make_log: MakeLog) -> None:
    """The stream is a callable, so a replaced ``sys.stderr`` (pytest's capture) gets the lines."""
    first, second = io.StringIO(), io.StringIO()
    current = [first]
    log = make_log(lambda: current[0], interval=60)

    log.record("GET", "/one", 200, 1.0, "req")
    log.flush()
    current[0] = second
    log.record("GET", "/two", 200, 1.0, "req")
    log.flush()

    assert paths_of(lines_of(first)) == ["/one"]
    assert paths_of(lines_of(second)) == ["/two"]


# --- formats ----------------------------------------------------------------------------------------


def test_a_json_line_has_the_fields_of_every_other_log_line(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, json=True, interval=60)
    before = datetime.now(UTC)

    log.record("GET", "/p", 200, 1.23456, "req-json-1")
    log.flush()

    [line] = lines_of(stream)
    record = json.loads(line)
    assert set(record) == {"ts", "level", "logger", "msg", "request_id", "pid", "extra"}
    assert record["level"] == "INFO"
    assert record["logger"] == "access"
    assert record["msg"] == "GET /p 200 1.2ms"
    assert record["request_id"] == "req-json-1"
    assert record["pid"] == os.getpid()
    assert record["extra"] == {"method": "GET", "path": "/p", "status": 200, "duration_ms": 1.235}
    at = datetime.fromisoformat(record["ts"])
    assert at.utcoffset() == timedelta(0)
    assert before.timestamp() - 1 <= at.timestamp() <= time.time() + 1


def test_a_line_carries_the_time_it_was_recorded_not_the_time_it_was_written(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, json=True, interval=60)
    log.record("GET", "/early", 200, 1.0, "req")
    recorded = time.time()
    time.sleep(0.3)

    log.flush()

    at = datetime.fromisoformat(json.loads(lines_of(stream)[0])["ts"]).timestamp()
    assert at <= recorded + 0.05


@pytest.mark.parametrize(("duration", "shown"), [(0.04, "0.0"), (12.349, "12.3"), (1500.0, "1500.0")])
def test_the_text_line_shows_the_duration_to_a_tenth_of_a_millisecond(
    make_log: MakeLog, duration: float, shown: str
) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=60)

    log.record("DELETE", "/api/v1/items/x", 404, duration, "text-req-1")
    log.flush()

    [line] = lines_of(stream)
    assert line.endswith(f" INFO    text-req-1 DELETE /api/v1/items/x 404 {shown}ms")
    match = TEXT_LINE.match(line)
    assert match is not None
    assert match.group(5) == shown


# --- when the stream does not keep up -----------------------------------------------------------------


def test_overflow_keeps_the_newest_lines_and_reports_the_dropped_ones_once(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=60, capacity=3)

    for i in range(5):
        log.record("GET", f"/{i}", 200, 1.0, "req")
    assert log.flush() == 3

    lines = lines_of(stream)
    assert paths_of(lines[:3]) == ["/2", "/3", "/4"]  # the oldest two were pushed out
    assert len(lines) == 4
    notice = DROPPED.search(lines[3])
    assert notice is not None
    assert notice.group(1) == "2"

    log.record("GET", "/5", 200, 1.0, "req")
    log.flush()
    assert [line for line in lines_of(stream)[4:] if DROPPED.search(line)] == []  # reported once

    for i in range(6, 10):
        log.record("GET", f"/{i}", 200, 1.0, "req")
    log.flush()
    later = lines_of(stream)[5:]
    assert paths_of(later) == ["/7", "/8", "/9"]
    assert [int(m.group(1)) for line in later if (m := DROPPED.search(line))] == [1]


def test_the_dropped_notice_is_a_json_line_in_json_format(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, json=True, interval=60, capacity=1)

    for i in range(4):
        log.record("GET", f"/{i}", 200, 1.0, "req")
    log.flush()

    records = [json.loads(line) for line in lines_of(stream)]
    assert [r["extra"]["path"] for r in records[:1]] == ["/3"]
    assert len(records) == 2
    assert "access log: 3 line(s) dropped" in records[1]["msg"]
    assert records[1]["level"] == "INFO"


def test_written_and_reported_lines_account_for_every_recorded_one(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=0.001, batch=10, capacity=50)
    threads, per_thread = 4, 5_000

    def work(t: int) -> None:
        for i in range(per_thread):
            log.record("GET", f"/{t}/{i}", 200, 1.0, "req")

    in_threads(threads, work)
    log.close()

    lines = lines_of(stream)
    reported = sum(int(m.group(1)) for line in lines if (m := DROPPED.search(line)))
    written = len(lines) - sum(1 for line in lines if DROPPED.search(line))
    assert written + reported == threads * per_thread


class Broken(io.StringIO):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        raise self.error


@pytest.mark.parametrize(
    "error",
    [BrokenPipeError("nobody reads"), OSError("disk full"), ValueError("I/O operation on closed file")],
)
def test_a_broken_stream_does_not_raise_into_the_caller(make_log: MakeLog, error: Exception) -> None:
    stream = Broken(error)
    log = make_log(stream, interval=60)

    log.record("GET", "/p", 200, 1.0, "req")
    log.flush()
    log.record("GET", "/q", 200, 1.0, "req")
    log.close()

    assert stream.attempts == 2


def test_a_closed_stream_does_not_raise_into_the_caller(make_log: MakeLog) -> None:
    stream = io.StringIO()
    stream.close()
    log = make_log(stream, interval=60)

    log.record("GET", "/p", 200, 1.0, "req")

    assert log.flush() == 1  # taken off the queue: those lines are gone, not retried forever


def test_the_writer_thread_survives_a_broken_stream(make_log: MakeLog) -> None:
    healthy = io.StringIO()
    current: list[TextIO] = [Broken(BrokenPipeError("nobody reads"))]
    log = make_log(lambda: current[0], interval=0.02)

    log.record("GET", "/lost", 200, 1.0, "req")
    wait_for(lambda: current[0].attempts >= 1, within=2.0)  # type: ignore[attr-defined]
    current[0] = healthy
    log.record("GET", "/kept", 200, 1.0, "req")

    wait_for(lambda: bool(healthy.getvalue()), within=2.0)
    assert paths_of(lines_of(healthy)) == ["/kept"]


def test_a_stream_that_cannot_be_obtained_does_not_raise_into_the_caller(make_log: MakeLog) -> None:
    def no_stream() -> TextIO:
        raise OSError("stderr is gone")

    log = make_log(no_stream, interval=60)

    log.record("GET", "/p", 200, 1.0, "req")
    log.flush()
    log.close()


# --- threads -----------------------------------------------------------------------------------------------


def test_records_from_several_threads_are_all_written(make_log: MakeLog) -> None:
    stream = io.StringIO()
    log = make_log(stream, interval=0.005, batch=64)
    threads, per_thread = 8, 2_000
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            log.record("GET", f"/{t}/{i}", 200, 1.0, f"thread-{t}")

    in_threads(threads, work)
    log.close()

    lines = lines_of(stream)
    assert not any(DROPPED.search(line) for line in lines)
    paths = paths_of(lines)
    assert len(paths) == threads * per_thread
    for t in range(threads):  # each thread's own lines keep their order
        assert [p for p in paths if p.startswith(f"/{t}/")] == [f"/{t}/{i}" for i in range(per_thread)]


async def serve_one(status: int, request_id: str) -> None:
    """One GET /things through ``RequestContextMiddleware`` answering ``status``."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    scope: Scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                    "scheme": "http", "path": "/things", "raw_path": b"/things", "query_string": b"",
                    "root_path": "", "headers": [(b"x-request-id", request_id.encode())],
                    "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    await RequestContextMiddleware(app)(scope, receive, send)


# --- the process's access log ---------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    configure_logging(level="WARNING", enqueue=False)


def test_configure_replaces_the_log_and_writes_what_the_old_one_held(restore_logging: None) -> None:
    first, second = io.StringIO(), io.StringIO()
    old = access_log_module.configure(json=False, enabled=True, stream=lambda: first)
    assert access_log() is old
    old.record("GET", "/old", 200, 1.0, "req")

    new = access_log_module.configure(json=True, enabled=True, stream=lambda: second)
    new.record("GET", "/new", 200, 1.0, "req")
    new.flush()

    assert access_log() is new
    assert paths_of(lines_of(first)) == ["/old"]
    assert [json.loads(line)["extra"]["path"] for line in lines_of(second)] == ["/new"]


@pytest.mark.parametrize(("level", "enabled"), [("WARNING", False), ("ERROR", False), ("INFO", True),
                                                 ("DEBUG", True)])
def test_configure_logging_enables_the_access_log_at_info_and_below(
    restore_logging: None, level: str, enabled: bool
) -> None:
    configure_logging(level=level, enqueue=False)

    assert access_log().enabled is enabled


async def test_the_middleware_records_nothing_when_the_log_is_disabled(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="WARNING", enqueue=False)
    await serve_one(200, "quiet-request-1")

    assert access_log().flush() == 0
    assert "quiet-request-1" not in capsys.readouterr().err


async def test_at_info_the_access_line_goes_to_stderr_in_the_sinks_format(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="INFO", json=True, enqueue=False)
    await serve_one(201, "loud-request-1")

    assert access_log().flush() == 1
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if "loud-request-1" in line]
    assert len(records) == 1
    assert records[0]["logger"] == "access"
    assert records[0]["msg"].startswith("GET /things 201 ")
    assert records[0]["request_id"] == "loud-request-1"
