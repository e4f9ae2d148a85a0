"""The access log, one line per request, written off the request path.

Through loguru a line costs the request about 40 µs of CPU (building the record, formatting it and,
with ``enqueue=True``, pickling it through a pipe to a writer thread that then competes for the
GIL): more than a fifth of what bare FastAPI spends on a whole request (bench/README.md). Here the
request only appends a tuple to a deque. A daemon thread wakes every ``interval`` seconds (sooner
when ``batch`` lines are waiting), formats what has accumulated in the sink's format and writes it
with one call to the same stream as every other log line. Lines keep their order and their own
timestamps; at most ``interval`` passes before a line is on the stream, and ``flush()`` (called at
shutdown and at exit) writes whatever is left.

If the stream stops taking lines (a full pipe, nobody reading), at most ``capacity`` lines wait;
older ones are dropped and the count of dropped lines is written when the stream recovers, never
silently. The line formats are ``core.observability.logging``'s: JSON lines in production, text in
development.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

import orjson

from core.observability.context import current_ids

# time, method, path, status, duration ms, request id, and (tracing on, a span current) the trace
# and span ids of the request's SERVER span
Entry = tuple[float, str, str, int, float, str, "tuple[str, str] | None"]


def json_line(entry: Entry, pid: int) -> str:
    at, method, path, status, duration_ms, request_id, ids = entry
    line: dict[str, object] = {
        "ts": datetime.fromtimestamp(at, UTC).isoformat(),
        "level": "INFO",
        "logger": "access",
        "msg": f"{method} {path} {status} {duration_ms:.1f}ms",
        "request_id": request_id,
    }
    if ids is not None:
        line["trace_id"], line["span_id"] = ids
    line["pid"] = pid
    line["extra"] = {"method": method, "path": path, "status": status, "duration_ms": round(duration_ms, 3)}
    return orjson.dumps(line).decode() + "\n"


def text_line(entry: Entry, pid: int) -> str:
    at, method, path, status, duration_ms, request_id, ids = entry
    clock = datetime.fromtimestamp(at).strftime("%H:%M:%S.%f")[:-3]
    trace = "" if ids is None else f" trace_id={ids[0]} span_id={ids[1]}"
    return f"{clock} INFO    {request_id}{trace} {method} {path} {status} {duration_ms:.1f}ms\n"


class AccessLog:
    def __init__(
        self,
        stream: Callable[[], TextIO] = lambda: sys.stderr,
        *,
        json: bool = False,
        enabled: bool = True,
        traced: bool = False,
        interval: float = 0.1,
        batch: int = 512,
        capacity: int = 100_000,
    ) -> None:
        self._stream = stream
        self._format = json_line if json else text_line
        self.enabled = enabled
        self._traced = traced  # tracing configured: each line takes the current span's ids
        self._interval = interval
        self._batch = batch
        self._entries: deque[Entry] = deque(maxlen=capacity)
        self._appended = 0  # how many entries were ever appended; read with the count written
        self._written = 0
        self._dropped = 0
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # one flush at a time (the thread, shutdown, atexit)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def record(self, method: str, path: str, status: int, duration_ms: float, request_id: str) -> None:
        """The request path's only cost: one append (thread-safe; never blocks on I/O)."""
        entries = self._entries
        entries.append((time.time(), method, path, status, duration_ms, request_id,
                        current_ids() if self._traced else None))
        self._appended += 1
        if self._thread is None:
            self._start()
        elif len(entries) >= self._batch:
            self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Write every waiting line now; returns how many were written."""
        with self._lock:
            entries, pid, fmt = self._entries, self._pid, self._format
            lines: list[str] = []
            while True:
                try:
                    lines.append(fmt(entries.popleft(), pid))
                except IndexError:
                    break
            taken = len(lines)
            # Appended but neither written nor waiting: pushed out of the full deque.
            dropped = self._appended - self._written - self._dropped - taken - len(entries)
            if dropped > 0:
                self._dropped += dropped
                notice = f"access log: {dropped} line(s) dropped"
                lines.append(fmt((time.time(), "-", notice, 0, 0.0, "-", None), pid))
            if not lines:
                return 0
            try:
                stream = self._stream()
                stream.write("".join(lines))
                stream.flush()
            except (OSError, ValueError):  # closed or broken stream: these lines are gone
                pass
            self._written += taken
            return taken

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
        self._thread = None
        self._closed.clear()
        self.flush()


_current = AccessLog(enabled=False)


def access_log() -> AccessLog:
    """The process's access log (``core.observability.logging.configure_logging`` sets it up)."""
    return _current


def configure(*, json: bool, enabled: bool, stream: Callable[[], TextIO] = lambda: sys.stderr,
              traced: bool = False) -> AccessLog:
    """Replace the process's access log (what was waiting in the old one is written first)."""
    global _current
    _current.close()
    _current = AccessLog(stream, json=json, enabled=enabled, traced=traced)
    return _current


atexit.register(lambda: _current.close())
