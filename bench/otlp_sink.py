#!/usr/bin/env python3
"""The benchmark's span sink: an OTLP/HTTP receiver that answers and forgets.

``bench/run.py --tracing`` points each traced server variant at ``http://127.0.0.1:<port>/<variant>``,
so its exporter POSTs protobuf batches to ``/<variant>/v1/traces``. Every such POST is answered
``200`` with an empty body (an empty ``ExportTraceServiceResponse``: nothing rejected); the payload is
read and dropped, only the requests and bytes are counted, per path. ``GET /counts`` returns the
counts as JSON ``{path: {"requests": n, "bytes": b}}``.

It does as little as it can: it shares the benchmark's two cores with the servers under test, so it
decodes nothing and logs nothing per request. Standard library only.

    python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TRACES_SUFFIX = "/v1/traces"
CHUNK = 1 << 16


class Sink(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, Handler)
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}

    def count(self, path: str, size: int) -> None:
        with self._lock:
            entry = self._counts.setdefault(path, [0, 0])
            entry[0] += 1
            entry[1] += size

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {path: {"requests": n, "bytes": b} for path, (n, b) in self._counts.items()}


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps the exporter's connection open between batches (every answer has a length).
    protocol_version = "HTTP/1.1"
    server: Sink

    def do_POST(self) -> None:
        size = self._drain_body()
        if size is None:
            self.send_error(400, "unreadable body")
            return
        path = self.path.split("?", 1)[0]
        self.server.count(path, size)
        self._answer(200 if path.endswith(TRACES_SUFFIX) else 404, b"", "application/x-protobuf")

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/counts":
            self._answer(404, b"", "text/plain")
            return
        self._answer(200, json.dumps(self.server.snapshot()).encode(), "application/json")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _drain_body(self) -> int | None:
        """Read the body and drop it; its size in bytes, or None when it cannot be framed."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            total = 0
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return None
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return total
                if self._skip(size) != size:
                    return None
                self.rfile.readline(1024)  # the CRLF after the chunk
                total += size
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return None
        return length if length >= 0 and self._skip(length) == length else None

    def _skip(self, size: int) -> int:
        done = 0
        while done < size:
            data = self.rfile.read(min(CHUNK, size - done))
            if not data:
                break
            done += len(data)
        return done

    def log_message(self, format: str, *args: object) -> None:
        """No line per request."""


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench/otlp_sink.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with Sink((args.host, args.port)) as sink:
        print(f"otlp sink on http://{args.host}:{args.port}", flush=True)
        sink.serve_forever()


if __name__ == "__main__":
    main()
