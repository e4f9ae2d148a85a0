"""A real OTLP/HTTP trace receiver on 127.0.0.1 for tests: what a collector would get, decoded.

The exporters of ``atrium serve`` and ``atrium worker`` POST ``ExportTraceServiceRequest`` protobufs
to ``<url>/v1/traces``; the receiver answers 200 with an empty ``ExportTraceServiceResponse`` and
keeps every span (ids as hex, kind and status by name, attributes as Python values, links, the
``service.name`` of the resource that sent it). A stdlib HTTP server on its own thread, bound to
port 0: safe beside other tests on the same machine.

    with OtlpReceiver() as receiver:
        ... settings otel_exporter_otlp_endpoint=receiver.url ...
        spans = receiver.trace(trace_id); print(render_tree(spans))
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str  # SERVER, CLIENT, PRODUCER, CONSUMER, INTERNAL
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]  # (trace id, span id) of each linked span
    status: str  # UNSET, OK, ERROR
    status_message: str
    events: tuple[str, ...]  # e.g. "exception"
    service: str  # the resource's service.name
    start_ns: int
    end_ns: int

    @property
    def module(self) -> Any:
        return self.attributes.get("atrium.module")


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _name(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix)


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None,
                    name=span.name,
                    kind=_name(Span.SpanKind.Name(span.kind), "SPAN_KIND_"),
                    attributes=_attributes(span.attributes),
                    links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                    status=_name(Status.StatusCode.Name(span.status.code), "STATUS_CODE_"),
                    status_message=span.status.message,
                    events=tuple(event.name for event in span.events),
                    service=service,
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                ))
    return spans


class OtlpReceiver:
    """Start/stop the receiver; a context manager. ``spans`` holds everything received so far."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.requests = 0
        self.refused: list[str] = []  # what was answered with an error, and why
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The base URL to configure (the exporter appends /v1/traces)."""
        assert self._server is not None, "not started"
        return f"http://{self.host}:{self._server.server_address[1]}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.trace_id == trace_id]

    def find(self, predicate: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
        return [s for s in self.spans if predicate(s)]

    def _received(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self.requests += 1

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if self.path != TRACES_PATH or content_type != PROTOBUF:
                    receiver.refused.append(f"{self.path} {content_type}")
                    self._answer(404 if self.path != TRACES_PATH else 415, b"")
                    return
                try:
                    spans = decode(body)
                except Exception as exc:  # a payload the real exporter would never send
                    receiver.refused.append(f"undecodable: {exc}")
                    self._answer(400, b"")
                    return
                receiver._received(spans)
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", PROTOBUF)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def render_tree(spans: list[ReceivedSpan]) -> str:
    """The spans of one trace as an indented tree (children by start time), orphans flagged."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str | None, list[ReceivedSpan]] = {}
    for span in spans:
        parent = span.parent_span_id if span.parent_span_id in by_id else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def walk(span: ReceivedSpan, depth: int) -> None:
        missing = span.parent_span_id is not None and span.parent_span_id not in by_id
        orphan = f" ORPHAN(parent {span.parent_span_id} missing)" if missing else ""
        link = f" link->{','.join(s for _, s in span.links)}" if span.links else ""
        status = f" {span.status}" if span.status != "UNSET" else ""
        lines.append(f"{'  ' * depth}{span.kind:<8} {span.name} [{span.service} "
                     f"module={span.module} id={span.span_id}{link}]{status}{orphan}")
        for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns):
            walk(child, depth + 1)

    for root in sorted(children.get(None, []), key=lambda s: s.start_ns):
        walk(root, 0)
    return "\n".join(lines)
