#!/usr/bin/env python3
"""Benchmark ``GET /api/v1/items/{id}`` and ``POST /api/v1/items`` on the production profile, with
the fast path on and off (``ATRIUM_FAST_PATH``), against bare FastAPI baselines, plus 2 workers vs
1 and the worker's memory after 100k/200k requests; or, with ``--pieces``, what each piece of the
fast path buys on its own; or, with ``--tracing``, what OpenTelemetry tracing costs (off, on at
some sampling ratios), spans exported to a sink of the benchmark's own (``bench/otlp_sink.py``).

Everything it needs it builds, and everything it builds it removes (in ``finally``, Ctrl-C
included): a private PostgreSQL database ``atrium_bench_<random>``, Redis keys under a private
namespace, the product servers (per fast path mode: cache on, cache off, two workers, a fresh one
for the memory run), one baseline server and their logs. Every row reports the CPU time its server
(the whole process tree: uvicorn's master and workers) spent per request. The issue's targets are
printed as PASS/FAIL for each mode.

    python bench/run.py            # on and off, 3 rounds x 10 s per target + memory runs (~13 minutes)
    python bench/run.py --quick    # smoke: 1 round x 2 s per target, memory runs scaled down (~3 minutes)
    python bench/run.py --pieces   # each piece left off in turn vs all on and all off (~14 minutes)
    python bench/run.py --pieces --quick
    python bench/run.py --tracing off,10,100   # tracing off, on at 10 % and 100 % sampling (~20 minutes)

See bench/README.md for what each row measures and how to read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

# BENCH_PG_HOST / BENCH_PG_PORT: another PostgreSQL (user postgres, trust auth), e.g. a private one
# when the shared server's connections are taken by test runs.
PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
PG_USER = "postgres"
# Connections the benchmark holds at one time: the server under load (its pool: 20), the
# baseline's asyncpg pool (10-20) and a few (release_connections closes the idle servers' ones).
PG_CONNECTIONS_NEEDED = 45
BASELINE_APPLICATION = "atrium-bench-baseline"  # the baseline's connections, by application_name
REDIS_URL = "redis://127.0.0.1:6379/0"
API = "/api/v1"
ADMIN_EMAIL = "bench-admin@example.com"

# The fast path's pieces (core.fastpath.PIECES; checked against the product at start-up) and the
# modes ATRIUM_FAST_PATH takes.
PIECES = ("handler", "transactions", "pool", "redis")
MODES = ("on", "off", "auto")
PIECE_BAR_PCT = 5.0  # a piece that buys less than this on every row goes (issue 14, item 8)
ROW_NAMES = {"warm": "warm GET", "cold": "cold GET", "post": "POST"}  # the rows of --pieces
# --tracing: "off" (no ATRIUM_OTEL_* at all, as deployed today) or a sampling percentage. Spans of a
# traced variant go to http://127.0.0.1:<sink port>/<variant name>, i.e. POST /<variant>/v1/traces.
TRACING_OFF = "off"
# --control <commit>: one more variant, tracing off, served from a checkout of that commit with its
# own virtualenv (from its own uv.lock), on the same database: "tracing off costs nothing" is judged
# against the code before tracing in the same rounds, not against an older run on a noisy machine.
CONTROL = "control"
TRACES_PATH = "/v1/traces"


# UUIDs and request ids, so a log message repeated for many requests counts as one.
_BACKGROUND = re.compile(r"\(Background on this error at: [^)]*\)?")  # SQLAlchemy's link
_IDS = re.compile(r"\b[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\b|\b[0-9a-f]{32}\b")


class BenchError(Exception):
    """A step failed; the message says which and where its log is."""


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


# --- interpreter and tools ------------------------------------------------------------------


def venv_dir() -> Path:
    venv = Path(os.environ.get("ATRIUM_VENV") or ".venv")
    return venv if venv.is_absolute() else ROOT / venv


def venv_python() -> Path:
    """The venv's python (``ATRIUM_VENV``, default ``.venv``), else the running interpreter."""
    candidate = venv_dir() / "bin" / "python"
    return candidate if candidate.exists() else Path(sys.executable)


def atrium_command(python: Path) -> list[str]:
    script = python.parent / "atrium"
    if script.exists():
        return [str(script)]
    return [str(python), "-c", "import sys, main; sys.exit(main.cli())"]


def find_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError(
            "wrk not found. Install it (Debian/Ubuntu: apt-get install -y wrk; macOS: brew install wrk) "
            "or run scripts/bench, which installs it with apt-get when it can."
        )
    return wrk


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- PostgreSQL and Redis -------------------------------------------------------------------


def pg_execute(sql: str, database: str = "postgres", wait: float = 60.0) -> Any:
    """One statement's value; waits up to ``wait`` seconds while PostgreSQL has no free connection
    (others' test runs may hold them for a while)."""
    import asyncpg

    async def run() -> Any:
        deadline = time.monotonic() + wait
        while True:
            try:
                conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)
                break
            except asyncpg.TooManyConnectionsError as exc:
                if time.monotonic() >= deadline:
                    raise BenchError(
                        f"PostgreSQL on {PG_HOST}:{PG_PORT} had no free connection for {wait:g} s ({exc}); "
                        "wait for its other users, or point BENCH_PG_HOST/BENCH_PG_PORT at another server"
                    ) from None
                await asyncio.sleep(1.0)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_timeout=5)


def redis_delete_namespace(namespace: str) -> int:
    client = redis_client()
    try:
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{namespace}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += client.delete(*batch)
                batch.clear()
        if batch:
            deleted += client.delete(*batch)
        return deleted
    finally:
        client.close()


# --- processes ------------------------------------------------------------------------------


class Proc:
    """A child in its own session (Ctrl-C reaches only us; we stop it), logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        with suppress(OSError):
            text = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join(text[-lines:])
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            with suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


def run_checked(name: str, argv: Sequence[str], env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(
        list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise BenchError(f"{name} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


# --- HTTP -----------------------------------------------------------------------------------


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def wait_ready(proc: Proc, url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited (code {proc.popen.returncode}):\n{proc.tail()}")
        try:
            status, _, body = http("GET", url, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status} {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise BenchError(f"{proc.name} not ready at {url} after {timeout:.0f}s ({last}):\n{proc.tail()}")


def cache_counters(base: str) -> dict[str, float]:
    """``atrium_cache_requests`` by result from the product's /metrics (empty if absent)."""
    status, _, body = http("GET", base + "/metrics")
    counters: dict[str, float] = {}
    if status != 200:
        return counters
    pattern = re.compile(r'^atrium_cache_requests_total\{[^}]*result="(\w+)"[^}]*\}\s+([\d.e+]+)$')
    for line in body.decode().splitlines():
        match = pattern.match(line)
        if match:
            counters[match.group(1)] = counters.get(match.group(1), 0.0) + float(match.group(2))
    return counters




# --- CPU time of a server's process tree ----------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC_CHILDREN = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (state) on: the command name may hold spaces and parentheses."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _children(pid: int) -> list[int]:
    if _PROC_CHILDREN:
        kids: list[int] = []
        with suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with suppress(OSError):
                    kids += [int(child) for child in (task / "children").read_text().split()]
        return kids
    kids = []  # a kernel without /proc/<pid>/task/<tid>/children: find the children by parent pid
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (uvicorn's master, its workers, anything they started)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += _children(current)
    return tree


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid``'s process tree: each live process's own time (all its
    threads) plus the time of its children already reaped (cutime, cstime), so a worker that exits
    mid-window is still counted. None when it cannot be read (no /proc and no psutil)."""
    if Path("/proc/self/stat").exists():
        ticks, seen = 0, False
        for member in process_tree(pid):
            fields = _stat_fields(member)
            if fields is not None:  # utime, stime, cutime, cstime: fields 14-17
                ticks += sum(int(value) for value in fields[11:15])
                seen = True
        return ticks / _CLK_TCK if seen else None
    try:
        import psutil  # type: ignore[import-not-found]  # only where there is no /proc; never installed for this
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        total = 0.0
        for member in [root, *root.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess):
                t = member.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
        return total
    except psutil.NoSuchProcess:
        return None
# --- wrk ------------------------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"

# Each wrk thread walks its own slice of the ids (thread k takes ids k, k+T, k+2T, ...), so the
# requests in flight at one moment are for different items: the product's single flight (one
# load shared by concurrent misses on the same key) cannot merge them, and each request is a
# real database read.
ROTATE_LUA = """\
local all_ids = {%(ids)s}
local nthreads = %(threads)d
local created = 0
local mine, n, i, prefix = {}, 0, 0, "/"

function setup(thread)
  thread:set("tid", created)
  created = created + 1
end

function init(args)
  prefix = args[1]
  for k = tid + 1, #all_ids, nthreads do
    n = n + 1
    mine[n] = all_ids[k]
  end
end

function request()
  i = i %% n + 1
  return wrk.format("GET", prefix .. mine[i])
end
"""


def to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    avg_ms: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]
    # The server's process tree over the wrk run: CPU seconds, and microseconds per request done.
    cpu_s: float | None = None
    cpu_us_per_request: float | None = None

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def parse_wrk(output: str) -> Sample:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+" + _DURATION + r"\s*$", output, re.M)
    p99 = re.search(r"^\s+99%\s+" + _DURATION + r"\s*$", output, re.M)
    avg = re.search(r"^\s+Latency\s+" + _DURATION, output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rps and p50 and p99 and avg and total):
        raise BenchError(f"could not parse wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    socket_errors: dict[str, int] = {}
    if sock:
        kinds = ("connect", "read", "write", "timeout")
        socket_errors = dict(zip(kinds, map(int, sock.groups()), strict=True))
    return Sample(
        rps=float(rps.group(1)),
        p50_ms=to_ms(*p50.groups()),
        p99_ms=to_ms(*p99.groups()),
        avg_ms=to_ms(*avg.groups()),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
    )


# POST /items: the same JSON body on every request (names need not be unique), a bearer token.
POST_LUA = """\
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
"""
POST_BODY = {"name": "Bench posted item", "description": "Created by wrk.", "price": 1999, "currency": "EUR"}

# The issue's targets: a row's req/s over its baseline's, at least this much.
RATIO_GOALS = {"warm": 0.60, "cold": 0.75, "post": 0.70, "warm-2w": 1.70}
P99_OVER_P50_MAX = 3.0
PEAK_RSS_MAX_MB = 150.0
RSS_GROWTH_MAX_MB = 2.0  # "no growth" between the two milestones, within allocator noise


@dataclass
class Target:
    key: str  # unique: "bare", "warm@on", "cold@skip-pool"
    row: str  # what is measured: "bare", "warm", "cold", "post", ...
    label: str
    base: str  # http://127.0.0.1:port
    path: str  # a fixed path, or a prefix the rotation script appends ids to
    pid: int | None = None  # the server's root process: its tree's CPU time is read around each run
    mode: str | None = None  # the product server's variant ("on", "off", "skip-pool"); None: baseline
    mode_label: str = ""
    rotate: bool = False
    baseline: str | None = None  # key of the target this one is compared with
    note: str = ""
    script: Path | None = None  # a wrk Lua script of its own (POST)
    product: bool = False  # a product row: its p99/p50 is held to the target
    samples: list[Sample] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.label} [{self.mode_label}]" if self.mode else self.label


class Wrk:
    def __init__(self, binary: str, threads: int, connections: int, script: Path) -> None:
        self.binary = binary
        self.threads = threads
        self.connections = connections
        self.script = script
        self.served: dict[str, int] = {}  # requests wrk completed per server (base URL), all runs

    def argv(self, target: Target, seconds: float) -> list[str]:
        argv = [self.binary, f"-t{self.threads}", f"-c{self.connections}", f"-d{seconds:g}s",
                "--latency", "--timeout", "10s"]
        if target.rotate:
            return [*argv, "-s", str(self.script), target.base + "/", "--", target.path]
        if target.script is not None:
            return [*argv, "-s", str(target.script), target.base + target.path]
        return [*argv, target.base + target.path]

    def run(self, target: Target, seconds: float, *, cpu: bool = False) -> Sample:
        """One wrk run; with ``cpu``, the CPU time of the target's server tree over it as well."""
        before = tree_cpu_seconds(target.pid) if cpu and target.pid else None
        result = subprocess.run(
            self.argv(target, seconds), capture_output=True, text=True, timeout=seconds + 60,
            stdin=subprocess.DEVNULL,
        )
        after = tree_cpu_seconds(target.pid) if before is not None and target.pid else None
        if result.returncode != 0:
            raise BenchError(f"wrk failed on {target.name}: {result.stderr or result.stdout}")
        sample = parse_wrk(result.stdout)
        self.served[target.base] = self.served.get(target.base, 0) + sample.requests
        if before is not None and after is not None:
            sample.cpu_s = round(after - before, 3)
            if sample.requests:
                sample.cpu_us_per_request = round((after - before) * 1e6 / sample.requests, 1)
        return sample


# --- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration of the product servers: a fast path mode, less some pieces, traced or not."""

    name: str  # "on", "off", "auto", "skip-pool", "trace-10"
    label: str  # "fast path on", "on - pool", "on, tracing 10 %"
    fast_path: str  # ATRIUM_FAST_PATH
    skip: tuple[str, ...] = ()  # ATRIUM_FAST_PATH_SKIP
    sampling: float | None = None  # ATRIUM_OTEL_SAMPLING_RATIO; None: tracing off (no ATRIUM_OTEL_*)
    otlp_endpoint: str = ""  # ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT when traced: the bench's sink
    checkout: Path | None = None  # --control: the servers run this checkout of another commit
    python: Path | None = None  # --control: with the interpreter of its own virtualenv

    @classmethod
    def mode(cls, mode: str) -> Variant:
        return cls(mode, f"fast path {mode}", mode)

    @classmethod
    def without(cls, piece: str) -> Variant:
        return cls(f"skip-{piece}", f"on - {piece}", "on", (piece,))

    @classmethod
    def traced(cls, mode: str, level: str, sink: str) -> Variant:
        """``mode`` with tracing ``level``: "off", or a sampling percentage exported to ``sink``."""
        name = f"trace-{level}"
        if level == TRACING_OFF:
            return cls(name, f"{mode}, tracing off", mode)
        return cls(name, f"{mode}, tracing {level} %", mode, sampling=float(level) / 100,
                   otlp_endpoint=f"{sink}/{name}")

    @classmethod
    def control(cls, mode: str, commit: str, checkout: Path, python: Path) -> Variant:
        """``mode`` with tracing off, served by ``commit``'s code (--control)."""
        return cls(CONTROL, f"{mode}, tracing off, at {commit[:8]}", mode, checkout=checkout, python=python)

    def env(self) -> dict[str, str]:
        env = {"ATRIUM_FAST_PATH": self.fast_path}
        if self.skip:
            env["ATRIUM_FAST_PATH_SKIP"] = ",".join(self.skip)
        if self.sampling is not None:
            env["ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT"] = self.otlp_endpoint
            env["ATRIUM_OTEL_SAMPLING_RATIO"] = f"{self.sampling:g}"
        return env

    def expected_pieces(self) -> list[str] | None:
        """The pieces a server of this variant must run; None when it depends on the versions (auto)."""
        if self.fast_path == "off":
            return []
        if self.fast_path == "on":
            return sorted(set(PIECES) - set(self.skip))
        return None


@dataclass
class Server:
    proc: Proc
    base: str  # http://127.0.0.1:port

    @property
    def pid(self) -> int:
        return self.proc.popen.pid


@dataclass
class Config:
    rounds: int
    duration: float
    warmup: float
    threads: int
    connections: int
    items: int
    quick: bool
    output: Path
    keep_logs: bool
    memory_requests: int  # the first RSS milestone; the second is twice as many
    modes: tuple[str, ...]  # ATRIUM_FAST_PATH of the product servers, side by side
    pieces: tuple[str, ...]  # --pieces: the pieces measured one by one (empty: the main benchmark)
    tracing: tuple[str, ...] = ()  # --tracing: "off" and sampling percentages (empty: not measured)
    control: str | None = None  # --control: a commit whose code is served beside tracing off


def _names(value: str, known: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{what}: {', '.join(unknown) or 'none given'}; "
                                         f"choose from {', '.join(known)}")
    return names


def _tracing_levels(value: str) -> tuple[str, ...]:
    """``off,10,100`` -> ("off", "10", "100"): off, or a sampling percentage from 0 to 100."""
    levels: list[str] = []
    for raw in value.split(","):
        level = raw.strip().lower().removesuffix("%").strip()
        if not level:
            continue
        if level != TRACING_OFF:
            try:
                percent = float(level)
            except ValueError:
                percent = -1.0
            if not 0.0 <= percent <= 100.0:
                raise argparse.ArgumentTypeError(
                    f"{raw.strip()!r} is neither off nor a sampling percentage from 0 to 100")
            level = f"{percent:g}"
        if level not in levels:
            levels.append(level)
    if not levels:
        raise argparse.ArgumentTypeError("none given; e.g. off,10,100")
    return tuple(levels)


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="GET and POST /api/v1/items on the production profile, fast path on and off, vs bare "
                    "FastAPI baselines; or (--pieces) what each piece of the fast path buys; or "
                    "(--tracing) what OpenTelemetry tracing costs.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 round x 2 s per target")
    parser.add_argument("--modes", type=lambda v: _names(v, MODES, "--modes"),
                        help="comma list of ATRIUM_FAST_PATH modes measured side by side "
                             "(default on,off; also auto)")
    parser.add_argument("--pieces", nargs="?", const=",".join(PIECES),
                        type=lambda v: _names(v, PIECES, "--pieces"), metavar="PIECE,...",
                        help="instead of the main benchmark: for each piece (default all: "
                             f"{','.join(PIECES)}), the warm, cold and POST rows with the fast path on "
                             "and ATRIUM_FAST_PATH_SKIP=<piece>, interleaved with all on and all off")
    parser.add_argument("--tracing", type=_tracing_levels, metavar="LEVELS",
                        help="comma list of tracing levels measured side by side on one fast path mode "
                             "(--modes, default on): off (no ATRIUM_OTEL_*) and sampling percentages "
                             "(ATRIUM_OTEL_SAMPLING_RATIO), e.g. off,10,100; spans go to an OTLP/HTTP sink "
                             "the benchmark starts (bench/otlp_sink.py). off is required: the cost is "
                             "measured against it")
    parser.add_argument("--control", metavar="COMMIT",
                        help="with --tracing: also serve COMMIT's code (a git worktree and a virtualenv "
                             "from its uv.lock, made and removed by the benchmark), tracing off, on the "
                             "same database, interleaved with the levels: what tracing off costs against "
                             "the code before it, in the same rounds")
    parser.add_argument("--rounds", type=int, help="rounds per target (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of wrk warm-up per target (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--items", type=int, help="items the cold rows rotate over (default 256; quick 128)")
    parser.add_argument("--output", type=Path,
                        help="results path without suffix (default bench/results/latest, --pieces: "
                             ".../pieces, --tracing: .../tracing; quick: .../quick, .../quick-pieces, "
                             "and .../quick for --tracing too)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (path printed)")
    parser.add_argument("--memory-requests", type=int,
                        help="RSS read after this many warm GETs and twice as many, on a fresh server "
                             "per mode (default 100000; quick 10000; 0 skips the memory runs; "
                             "not with --pieces)")
    args = parser.parse_args(argv)
    quick = args.quick
    pieces: tuple[str, ...] = args.pieces or ()
    if pieces and args.modes is not None:
        parser.error("--pieces measures on, off and on-minus-each-piece; --modes does not apply")
    if pieces and args.memory_requests:
        parser.error("--pieces has no memory run; --memory-requests does not apply")
    tracing: tuple[str, ...] = args.tracing or ()
    if tracing and pieces:
        parser.error("--tracing and --pieces are separate benchmarks; run one, then the other")
    if tracing and args.modes is not None and len(args.modes) != 1:
        parser.error("--tracing measures its levels on one fast path mode: give --modes on, off or auto "
                     "(default on), or run once per mode")
    if tracing and TRACING_OFF not in tracing:
        parser.error("--tracing needs off among its levels (e.g. off,10,100): the cost of tracing is "
                     "measured against it")
    if args.control and not tracing:
        parser.error("--control is measured against tracing off: give --tracing (e.g. off,10,100)")
    if pieces:
        default_output = "quick-pieces" if quick else "pieces"
    elif tracing:
        default_output = "quick" if quick else "tracing"  # quick.* is ignored by git
    else:
        default_output = "quick" if quick else "latest"
    config = Config(
        rounds=args.rounds or (1 if quick else 3),
        duration=args.duration or (2.0 if quick else 10.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if quick else 3.0),
        threads=args.threads,
        connections=args.connections,
        items=args.items or (128 if quick else 256),
        quick=quick,
        output=args.output or RESULTS / default_output,
        keep_logs=args.keep_logs,
        memory_requests=0 if pieces else (args.memory_requests if args.memory_requests is not None
                                          else (10_000 if quick else 100_000)),
        modes=args.modes or (("on",) if tracing else ("on", "off")),
        pieces=pieces,
        tracing=tracing,
        control=args.control,
    )
    if config.rounds < 1 or config.duration <= 0 or config.threads < 1 or config.connections < config.threads:
        parser.error("rounds >= 1, duration > 0, threads >= 1 and connections >= threads are required")
    if config.items < config.threads:
        parser.error("--items must be at least --threads")
    if not float(config.duration).is_integer() or not float(config.warmup).is_integer():
        parser.error("--duration and --warmup are whole seconds (wrk's -d)")
    return config


# Which pieces a server of each variant runs, and where it sends spans at which sampling ratio,
# asked of the product's own settings and core.fastpath in a subprocess with the servers'
# environment (the benchmark imports nothing of Atrium): a skip or a tracing setting the app ignored
# would make a variant's figures meaningless.
PIECES_PROBE = """\
import json, os, sys
from config import load_settings
from core import fastpath
found = {"PIECES": list(fastpath.PIECES)}
for name, env in json.loads(sys.stdin.read()).items():
    for key in ("ATRIUM_FAST_PATH", "ATRIUM_FAST_PATH_SKIP", "ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT",
                "ATRIUM_OTEL_SAMPLING_RATIO"):
        os.environ.pop(key, None)
    os.environ.update(env)
    settings = load_settings()
    found[name] = {
        "pieces": sorted(fastpath.pieces(settings.fast_path, tuple(settings.fast_path_skip))),
        "otlp_endpoint": settings.otel_exporter_otlp_endpoint,
        "sampling": settings.otel_sampling_ratio,
    }
print(json.dumps(found))
"""


def _rotated(items: Sequence[Any], by: int) -> list[Any]:
    by %= max(len(items), 1)
    return [*items[by:], *items[:by]]


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def paired_gain(with_it: Target, without_it: Target) -> dict[str, Any]:
    """What ``with_it`` buys over ``without_it``, round by round (both ran in the same round), then
    the median: req/s gain = req/s(with) / req/s(without) - 1; CPU saved = 1 - CPU µs per request
    (with) / CPU µs per request (without). In per cent; positive: ``with_it`` is better."""
    rps = [a.rps / b.rps - 1 for a, b in zip(with_it.samples, without_it.samples, strict=True) if b.rps]
    cpu = [1 - a.cpu_us_per_request / b.cpu_us_per_request
           for a, b in zip(with_it.samples, without_it.samples, strict=True)
           if a.cpu_us_per_request and b.cpu_us_per_request]
    return {
        "rps_gain_pct": _round(100 * statistics.median(rps), 1) if rps else None,
        "cpu_saved_pct": _round(100 * statistics.median(cpu), 1) if cpu else None,
        "rounds_rps_gain_pct": [round(100 * x, 1) for x in rps],
        "rounds_cpu_saved_pct": [round(100 * x, 1) for x in cpu],
        "errors": sum(s.errors for s in with_it.samples + without_it.samples),
    }


def tracing_cost(traced: Target, off: Target) -> dict[str, Any]:
    """What tracing costs a row, round by round against the same row with tracing off (both ran in
    the same round), then the median: CPU/req ratio = CPU µs per request (traced) / (off), req/s
    ratio = req/s (traced) / (off). Above 1 for CPU, below 1 for req/s: tracing costs."""
    pairs = list(zip(traced.samples, off.samples, strict=True))
    cpu = [a.cpu_us_per_request / b.cpu_us_per_request for a, b in pairs
           if a.cpu_us_per_request and b.cpu_us_per_request]
    rps = [a.rps / b.rps for a, b in pairs if b.rps]
    return {
        "cpu_ratio": _round(_median(cpu), 3),
        "rps_ratio": _round(_median(rps), 3),
        "rounds_cpu_ratio": [round(x, 3) for x in cpu],
        "rounds_rps_ratio": [round(x, 3) for x in rps],
        "errors": sum(s.errors for s in traced.samples + off.samples),
    }


def target_row(t: Target) -> dict[str, Any]:
    """A target's figures over the rounds (medians; the raw rounds kept)."""
    rps = [s.rps for s in t.samples]
    cpu = [s.cpu_us_per_request for s in t.samples if s.cpu_us_per_request is not None]
    return {
        "key": t.key,
        "row": t.row,
        "mode": t.mode,
        "mode_label": t.mode_label or None,
        "target": t.label,
        "url": t.base + t.path + ("<id>" if t.rotate else ""),
        "note": t.note,
        "rps_median": round(statistics.median(rps), 1),
        "rps_min": round(min(rps), 1),
        "rps_max": round(max(rps), 1),
        "cpu_us_per_request_median": _round(_median(cpu), 1),
        "cpu_us_per_request_min": _round(min(cpu), 1) if cpu else None,
        "cpu_us_per_request_max": _round(max(cpu), 1) if cpu else None,
        "p50_ms_median": round(statistics.median(s.p50_ms for s in t.samples), 3),
        "p99_ms_median": round(statistics.median(s.p99_ms for s in t.samples), 3),
        "p99_over_p50": round(statistics.median(s.p99_ms / max(s.p50_ms, 1e-9) for s in t.samples), 2),
        "product": t.product,
        "baseline": t.baseline,
        "ratio": None,
        "cpu_ratio": None,
        "ratio_goal": RATIO_GOALS.get(t.row) if t.baseline else None,
        "errors": sum(s.errors for s in t.samples),
        "rounds": [asdict(s) for s in t.samples],
    }


class Bench:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.python = venv_python()
        self.tag = secrets.token_hex(4)
        self.database = f"atrium_bench_{self.tag}"
        self.namespace = f"atrium-bench-{self.tag}"
        self.workdir = Path(tempfile.mkdtemp(prefix="atrium-bench-"))
        self.procs: list[Proc] = []
        self.database_created = False
        self.item_json = b""
        self.item_ids: list[str] = []
        self.cache_checks: dict[str, dict[str, float]] = {}
        self.token = ""
        self.secret_key = secrets.token_urlsafe(48)
        self.memory: dict[str, Any] = {}  # per mode
        self.variants: dict[str, Any] = {}  # per variant: its environment and the pieces it runs
        self.prime_errors: dict[str, int] = {}  # per target: errors in the unmeasured priming bursts
        self.server_warnings: dict[str, dict[str, int]] = {}
        self.tracing: dict[str, Any] | None = None  # --tracing: the sink's counts per variant
        self.control: dict[str, str] | None = None  # --control: the commit, its checkout and venv
        self.started = datetime.now(UTC)

    # environment

    def product_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
        env.update(
            ATRIUM_ENV="production",
            ATRIUM_SECRET_KEY=self.secret_key,  # one for all servers: a token works on each
            ATRIUM_DATABASE_URL=f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.database}",
            ATRIUM_REDIS_URL=REDIS_URL,
            ATRIUM_BROKER_URL=REDIS_URL,
            ATRIUM_CACHE_NAMESPACE=self.namespace,
            ATRIUM_BROKER_NAMESPACE=self.namespace,
            ATRIUM_SMTP_HOST="127.0.0.1",
            # Required in production; the benchmark never reaches the payment provider.
            ATRIUM_PAYMENTS_URL="http://127.0.0.1:9",
            ATRIUM_PAYMENTS_API_KEY="bench-" + secrets.token_hex(8),
            ATRIUM_PAYMENTS_WEBHOOK_SECRET=secrets.token_urlsafe(24),
            # The rate limiter stays on (every request pays its Redis round trip), with a quota
            # wrk cannot exhaust: one client address sends everything.
            ATRIUM_RATE_LIMITS='{"default": "100000000/minute"}',
            # One login serves the whole run (--pieces takes ~14 minutes): an access token that
            # outlives it, where the default (15 minutes) would not.
            ATRIUM_ACCESS_TOKEN_TTL_SECONDS="86400",
            # Production's own log level (INFO): every request writes its access line.
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def baseline_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ATRIUM_", "BENCH_"))}
        item_file = self.workdir / "item.json"
        item_file.write_bytes(self.item_json)
        env.update(
            BENCH_ITEM_JSON_FILE=str(item_file),
            # Named, so release_connections leaves its pool alone (asyncpg's pool has no pre-ping).
            BENCH_PG_DSN=f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.database}"
                         f"?application_name={BASELINE_APPLICATION}",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], cwd: Path = ROOT) -> Proc:
        proc = Proc(name, argv, env, self.workdir, cwd)
        self.procs.append(proc)
        return proc

    # steps

    def preflight(self) -> str:
        wrk = find_wrk()
        if not port_open(PG_HOST, PG_PORT):
            raise BenchError(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT} (try scripts/services)")
        if not port_open("127.0.0.1", 6379):
            raise BenchError("Redis does not answer on 127.0.0.1:6379 (try scripts/services)")
        free = int(pg_execute(
            "SELECT current_setting('max_connections')::int "
            "- current_setting('superuser_reserved_connections')::int "
            "- (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        ))
        if free < PG_CONNECTIONS_NEEDED:
            say(f"warning: PostgreSQL on {PG_HOST}:{PG_PORT} has {free} free connection(s); the benchmark "
                f"holds up to ~{PG_CONNECTIONS_NEEDED} at a time, so servers may answer 503 (too many "
                "clients). Wait for other users, or point BENCH_PG_HOST/BENCH_PG_PORT at another server")
        if tree_cpu_seconds(os.getpid()) is None:
            say("warning: no /proc (and no psutil): the CPU µs/request column stays empty")
        return wrk

    def create_database(self) -> None:
        pg_execute(f'CREATE DATABASE "{self.database}"')
        self.database_created = True
        say(f"database {self.database} created; redis namespace {self.namespace}")

    def prepare_schema(self, env: dict[str, str]) -> str:
        atrium = atrium_command(self.python)
        run_checked("atrium migrate", [*atrium, "migrate"], env)
        password = "Bench-" + secrets.token_urlsafe(18)
        run_checked("atrium create-admin",
                    [*atrium, "create-admin", "--email", ADMIN_EMAIL, "--password", password], env)
        return password

    def check_variants(self, variants: Sequence[Variant], strict: bool) -> None:
        """Ask the product which pieces each variant's servers run and whether they trace; a mismatch
        in the pieces (a skip or a mode the app would ignore) fails the run when ``strict``
        (--pieces), else is a warning; one in tracing (an endpoint or ratio the app would not use)
        always fails it."""
        controls = [v for v in variants if v.checkout is not None]
        for v in controls:  # another commit's code: the probe below asks this checkout's
            self.variants[v.name] = {"label": v.label, "env": v.env(), "pieces": None,
                                     "commit": (self.control or {}).get("commit")}
        variants = [v for v in variants if v.checkout is None]
        problem = tracing_problem = ""
        try:
            result = subprocess.run(
                [str(self.python), "-c", PIECES_PROBE], cwd=ROOT, env=self.product_env(),
                input=json.dumps({v.name: v.env() for v in variants}), capture_output=True, text=True,
                timeout=120,
            )
            if result.returncode != 0:
                problem = f"the probe failed:\n{(result.stderr or result.stdout).strip()[-1500:]}"
            else:
                found = json.loads(result.stdout.strip().splitlines()[-1])
                if tuple(found["PIECES"]) != PIECES:
                    problem = (f"the product's pieces are {', '.join(found['PIECES'])}; bench/run.py knows "
                               f"{', '.join(PIECES)} (update PIECES in bench/run.py)")
                for v in variants:
                    pieces, endpoint = found[v.name]["pieces"], found[v.name]["otlp_endpoint"]
                    settings = ' '.join(f'{k}={x}' for k, x in v.env().items())
                    self.variants[v.name] = {"label": v.label, "env": v.env(), "pieces": pieces}
                    expected = v.expected_pieces()
                    if expected is not None and pieces != expected:
                        problem += (f"\n{v.label} ({settings}) runs [{', '.join(pieces)}], "
                                    f"expected [{', '.join(expected)}]")
                    if endpoint:
                        self.variants[v.name]["tracing"] = {"otlp_endpoint": endpoint,
                                                            "sampling": found[v.name]["sampling"]}
                    if endpoint != v.otlp_endpoint or (
                            v.sampling is not None and abs(found[v.name]["sampling"] - v.sampling) > 1e-9):
                        tracing_problem += (f"\n{v.label} ({settings}) traces to {endpoint or 'nowhere'} "
                                            f"at {found[v.name]['sampling']:g}, expected "
                                            f"{v.otlp_endpoint or 'nowhere'}"
                                            + (f" at {v.sampling:g}" if v.sampling is not None else ""))
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
            problem = f"the probe failed: {exc}"
            tracing_problem = problem if any(v.sampling is not None for v in variants) else ""
        if tracing_problem:
            raise BenchError(f"the servers would not trace as asked: {tracing_problem.strip()}")
        if problem:
            message = f"could not confirm which fast path pieces each server runs: {problem.strip()}"
            if strict:
                raise BenchError(message)
            say(f"warning: {message}")
            return
        for v in variants:
            traced = self.variants[v.name].get("tracing")
            spans = f"; spans to {traced['otlp_endpoint']}, sampling {traced['sampling']:g}" if traced else ""
            say(f"{v.label}: pieces [{', '.join(self.variants[v.name]['pieces']) or 'none'}]{spans}")
        for v in controls:
            say(f"{v.label}: served from {v.checkout} (its own pieces and settings)")

    def serve_product(self, name: str, env: dict[str, str], workers: int = 1,
                      variant: Variant | None = None) -> Server:
        port = free_port()
        python = variant.python if variant is not None and variant.python is not None else self.python
        cwd = variant.checkout if variant is not None and variant.checkout is not None else ROOT
        argv = [*atrium_command(python), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers)]
        return Server(self.start(name, argv, env, cwd), f"http://127.0.0.1:{port}")

    def prepare_control(self, rev: str) -> Variant:
        """--control: a detached git worktree of ``rev`` and a virtualenv synced from its uv.lock by
        its own scripts/bootstrap (both under the run's temporary directory; removed by cleanup)."""
        commit = run_checked("git rev-parse", ["git", "-C", str(ROOT), "rev-parse", "--verify",
                                               f"{rev}^{{commit}}"], dict(os.environ)).strip()
        checkout, venv = self.workdir / "control", self.workdir / "control-venv"
        run_checked("git worktree add", ["git", "-C", str(ROOT), "worktree", "add", "--detach",
                                         str(checkout), commit], dict(os.environ))
        self.control = {"rev": rev, "commit": commit, "checkout": str(checkout)}
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
        env["ATRIUM_VENV"] = str(venv)
        say(f"control: {rev} = {commit[:12]} checked out in {checkout}; syncing its virtualenv")
        run_checked("control bootstrap", [str(checkout / "scripts" / "bootstrap")], env, timeout=900)
        return Variant.control(self.config.modes[0], commit, checkout, venv / "bin" / "python")

    def serve_baseline(self) -> Server:
        # The same uvicorn options as `atrium serve` (main._dispatch): one worker, loop and http
        # left at "auto" (uvloop + httptools from uvicorn[standard]), no access log, no Server
        # header, proxy headers on.
        port = free_port()
        argv = [str(self.python), "-m", "uvicorn", "bench.baseline_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log",
                "--no-server-header", "--proxy-headers"]
        return Server(self.start("baseline", argv, self.baseline_env()), f"http://127.0.0.1:{port}")

    def seed_apart(self, password: str, like: Variant) -> None:
        """Seed through a server of its own (``like``'s fast path mode, tracing off), stopped
        afterwards: no measured server has done more work than another before the run (the login,
        a thousand inserts, the objects they leave in its heap), and no traced one exported it."""
        seeder = self.serve_product("product-seed", self.product_env(ATRIUM_FAST_PATH=like.fast_path))
        try:
            wait_ready(seeder.proc, seeder.base + "/health/ready")
            self.seed(seeder.base, password)
        finally:
            seeder.proc.stop()
            self.procs.remove(seeder.proc)

    def seed(self, base: str, password: str) -> None:
        form = urllib.parse.urlencode({"username": ADMIN_EMAIL, "password": password}).encode()
        status, _, body = http("POST", base + API + "/auth/token", form,
                               {"Content-Type": "application/x-www-form-urlencoded"})
        if status != 200:
            raise BenchError(f"login failed: HTTP {status} {body[:300]!r}")
        self.token = json.loads(body)["access_token"]
        auth = {"Authorization": "Bearer " + self.token, "Content-Type": "application/json"}
        for n in range(self.config.items):
            item = {"name": f"Bench item {n:05d}", "description": "A benchmark item, served by id.",
                    "price": 1999, "currency": "EUR"}
            status, _, body = http("POST", base + API + "/items", json.dumps(item).encode(), auth)
            if status != 201:
                raise BenchError(f"creating an item failed: HTTP {status} {body[:300]!r}")
            self.item_ids.append(json.loads(body)["id"])
        status, _, body = http("GET", f"{base}{API}/items/{self.item_ids[0]}")
        if status != 200:
            raise BenchError(f"reading the item back failed: HTTP {status} {body[:300]!r}")
        self.item_json = body
        say(f"{len(self.item_ids)} items created through the API; payload {len(body)} bytes: {body.decode()}")

    def check_same_bytes(self, targets: Sequence[Target]) -> None:
        """Every GET target must answer the seeded item with the product's exact bytes; every POST
        target must create an item (201) with the same fields."""
        for target in targets:
            if target.script is not None:
                headers = {"Authorization": "Bearer " + self.token, "Content-Type": "application/json"}
                status, _, body = http("POST", target.base + target.path, json.dumps(POST_BODY).encode(),
                                       headers)
                fields = json.loads(body) if status == 201 else {}
                if status != 201 or any(fields.get(k) != v for k, v in POST_BODY.items()):
                    raise BenchError(f"{target.name}: POST answered HTTP {status} {body[:300]!r}")
                continue
            url = target.base + (target.path + self.item_ids[0] if target.rotate else target.path)
            status, _, body = http("GET", url)
            if status != 200 or body != self.item_json:
                raise BenchError(f"{target.name} answers differently from the product:\n"
                                 f"  product: {self.item_json!r}\n  {target.key}: HTTP {status} {body!r}")

    def write_script(self) -> Path:
        script = self.workdir / "rotate.lua"
        ids = ", ".join(f'"{i}"' for i in self.item_ids)
        script.write_text(ROTATE_LUA % {"ids": ids, "threads": self.config.threads})
        return script

    def write_post_script(self) -> Path:
        script = self.workdir / "post.lua"
        script.write_text(POST_LUA % {"body": json.dumps(POST_BODY), "token": self.token})
        return script

    def measure_memory(self, wrk: Wrk, target: Target, server: Server) -> dict[str, Any]:
        """RSS of a fresh one-worker product after N and 2N warm GETs (wrk in chunks until each
        milestone is passed; the count is wrk's, so a milestone is overshot by under one chunk)."""
        c = self.config
        first = c.memory_requests
        chunk = 2.0 if c.quick else 5.0
        pid = worker_pid(server.pid)
        figures: dict[str, Any] = {"pid": pid, "start": rss_mb(pid), "milestones": []}
        done = 0
        say(f"memory [{target.mode_label}]: {first:,} then {2 * first:,} warm GETs on a fresh server "
            f"(pid {pid})")
        for milestone in (first, 2 * first):
            while done < milestone:
                sample = wrk.run(target, chunk)
                if sample.errors:
                    raise BenchError(f"memory run: {target.name} answered errors: {sample}")
                done += sample.requests
            figures["milestones"].append({"requests": done, **rss_mb(pid)})
            say(f"memory [{target.mode_label}]: after {done:,} requests "
                f"VmRSS {figures['milestones'][-1]['rss_mb']:.1f} MB, "
                f"VmHWM {figures['milestones'][-1]['hwm_mb']:.1f} MB")
        return figures

    def measure(self, wrk: Wrk, groups: Sequence[Sequence[Target]], products: dict[str, str]) -> None:
        """Warm every target, then ``rounds`` rounds. In a round the groups (a baseline and the
        product rows compared with it, every variant of each) run one after the other, the targets
        of a group back to back, so the variants of a row are measured within seconds of each other
        and a slow minute hits them alike; the order of the groups, and within each group, is
        rotated every round so no target always goes first, and reversed every other round so no
        target always follows the same one (a traced server's exporter is still sending its last
        spans as the next target starts, which leaves that target less CPU: it batches more, and
        looks cheaper per request)."""
        c = self.config
        for target in (t for group in groups for t in group):
            say(f"warming {target.name} ({c.warmup:g} s)")
            self.release_connections()
            if c.warmup > 0:
                sample = wrk.run(target, c.warmup)
                if sample.errors:
                    raise BenchError(f"{target.name} failed during warm-up: {sample}")
        before = {key: cache_counters(base) for key, base in products.items()}
        width = max(len(t.name) for group in groups for t in group)
        prime = 1.0  # wrk takes whole seconds
        for r in range(c.rounds):
            for group in _rotated(groups, r):
                for target in (_rotated(group, r) if r % 2 == 0 else _rotated(group, r)[::-1]):
                    # The idle servers' connections closed, the target's pool refilled, unmeasured.
                    self.release_connections()
                    primed = wrk.run(target, prime)
                    if primed.errors:
                        self.prime_errors[target.key] = self.prime_errors.get(target.key, 0) + primed.errors
                        say(f"warning: {target.name}: {primed.errors} error(s) while its pool reconnected "
                            "(unmeasured)")
                    sample = wrk.run(target, c.duration, cpu=True)
                    target.samples.append(sample)
                    flag = f"  ERRORS: {sample.errors}" if sample.errors else ""
                    cpu = ("     -" if sample.cpu_us_per_request is None
                           else f"{sample.cpu_us_per_request:>6.0f}")
                    say(f"round {r + 1}/{c.rounds} {target.name:<{width}} {sample.rps:>7.0f} req/s "
                        f"{cpu} µs CPU/req  p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:7.2f} ms{flag}")
        for key, base in products.items():
            after = cache_counters(base)
            self.cache_checks[key] = {k: after.get(k, 0.0) - before[key].get(k, 0.0) for k in after}

    def release_connections(self) -> int:
        """Close the product servers' idle PostgreSQL connections to the benchmark's database.

        Each one-worker product server keeps up to its pool size (20) of connections open once a
        run has used them, and a run has a dozen servers or more: together more than PostgreSQL's
        default ``max_connections`` (100). Before each run the connections idle for over a second
        are terminated (``pg_terminate_backend``) and their end waited for, so at most the server
        under load and the one before it hold connections (a connection used a moment ago may
        belong to a request still finishing after wrk hung up: it is left alone). The product's
        pools replace a closed connection on checkout (pre-ping), and the run's unmeasured priming
        burst reopens them. The baseline's asyncpg pool (no pre-ping: a terminated connection would
        fail a request) is left alone."""
        where = (f"datname = '{self.database}' AND state = 'idle' AND pid <> pg_backend_pid() "
                 f"AND application_name <> '{BASELINE_APPLICATION}' "
                 "AND state_change < now() - interval '1 second'")
        closed = int(pg_execute(
            f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {where}"))
        deadline = time.monotonic() + 5.0
        while closed and time.monotonic() < deadline:
            if not int(pg_execute(f"SELECT count(*) FROM pg_stat_activity WHERE {where}")):
                break
            time.sleep(0.05)
        return closed

    def log_warnings(self) -> dict[str, dict[str, int]]:
        """Per server, its log's WARNING/ERROR/CRITICAL lines, counted by logger and message: a row
        whose server failed open (a rate limiter out of connections), or answered 503s, says so."""
        found: dict[str, dict[str, int]] = {}
        for proc in self.procs:
            counts: dict[str, int] = {}
            with suppress(OSError), proc.log_path.open(errors="replace") as log:
                for line in log:
                    if "WARNING" not in line and "ERROR" not in line and "CRITICAL" not in line:
                        continue
                    try:
                        record = json.loads(line)
                        level = str(record.get("level", ""))
                        if level not in ("WARNING", "ERROR", "CRITICAL"):
                            continue
                        message = f"{level} {record.get('logger', '?')}: {str(record.get('msg', ''))[:160]}"
                        error = str(record.get("exception") or "").strip().splitlines()
                        causes = [e for e in error if re.match(r"^[\w.]+(Error|Exception|Warning)\b", e)]
                        if causes:  # the first exception line, e.g. asyncpg's own error under SQLAlchemy's
                            message += f" ({causes[0][:160]})"
                    except (ValueError, AttributeError):
                        message = line.strip()[:180]
                    message = " ".join(_IDS.sub("<id>", _BACKGROUND.sub("", message)).split())
                    counts[message] = counts.get(message, 0) + 1
            if counts:
                found[proc.name] = counts
                for message, count in counts.items():
                    say(f"warning: {proc.name} logged {count} x {message}")
        return found

    def start_products(
        self, variants: Sequence[Variant], kinds: Sequence[str]
    ) -> dict[str, dict[str, Server]]:
        """Per variant, the product servers of ``kinds`` (warm: cache on; cold: cache off; warm2: two
        workers; mem: a fresh one-worker server for the memory run), one variant's at a time: with
        a dozen servers importing the app at once on two cores, a 2-worker server's children could
        not answer uvicorn's health check in time and were killed and respawned, again and again."""
        servers: dict[str, dict[str, Server]] = {}
        for v in variants:
            env = self.product_env(**v.env())
            cold_env = self.product_env(ATRIUM_CACHE_BACKEND="none", **v.env())
            servers[v.name] = {}
            for kind in kinds:
                servers[v.name][kind] = self.serve_product(
                    f"product-{kind}-{v.name}", cold_env if kind == "cold" else env,
                    workers=2 if kind == "warm2" else 1, variant=v,
                )
            for server in servers[v.name].values():
                wait_ready(server.proc, server.base + "/health/ready")
        say("product servers up: " + "; ".join(
            f"{v.label}: " + ", ".join(f"{kind} :{s.base.rsplit(':', 1)[1]}"
                                       for kind, s in servers[v.name].items())
            for v in variants))
        return servers

    def setup(self) -> tuple[str, str]:
        wrk_binary = self.preflight()
        self.create_database()
        password = self.prepare_schema(self.product_env())
        return wrk_binary, password

    def run(self) -> dict[str, Any]:
        wrk_binary, password = self.setup()
        if self.config.pieces:
            return self.run_pieces(wrk_binary, password)
        return self.run_modes(wrk_binary, password)

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise BenchError(f"{proc.name} died during the run:\n{proc.tail()}")

    # the main benchmark: each mode side by side, against the same baselines

    def run_modes(self, wrk_binary: str, password: str) -> dict[str, Any]:
        c = self.config
        sink = self.serve_sink() if c.tracing else None
        if sink is None:
            variants = [Variant.mode(m) for m in c.modes]
        else:
            variants = [Variant.traced(c.modes[0], level, sink.base) for level in c.tracing]
            if c.control:  # beside tracing off: the two compared are measured back to back
                at = next(i for i, v in enumerate(variants) if v.sampling is None) + 1
                variants.insert(at, self.prepare_control(c.control))
        self.check_variants(variants, strict=False)
        kinds = ["warm", "cold", "warm2"] + (["mem"] if c.memory_requests else [])
        servers = self.start_products(variants, kinds)
        self.seed_apart(password, variants[0])
        baseline = self.serve_baseline()
        wait_ready(baseline.proc, f"{baseline.base}/items/{self.item_ids[0]}")
        say(f"baselines up: {baseline.base}")
        post_script = self.write_post_script()

        item0 = self.item_ids[0]
        bare = Target("bare", "bare", "bare FastAPI (same payload)", baseline.base, f"/items/{item0}",
                      pid=baseline.pid, note="fixed pydantic model, no middleware, no DI, no I/O")
        asyncpg = Target("asyncpg", "asyncpg", "raw asyncpg FastAPI", baseline.base, "/db/items/",
                         pid=baseline.pid, rotate=True,
                         note=f"one SELECT by primary key per request, rotating over {c.items} items")
        asyncpg_post = Target("asyncpg-post", "asyncpg-post", "raw asyncpg FastAPI, POST", baseline.base,
                              "/db/items", pid=baseline.pid, script=post_script,
                              note="validate, one INSERT in one transaction, commit, 201")
        rows: dict[str, list[Target]] = {k: [] for k in ("warm", "warm-2w", "cold", "cold-one-id", "post")}
        for v in variants:
            s = servers[v.name]
            common = {"mode": v.name, "mode_label": v.label}
            rows["warm"].append(Target(
                f"warm@{v.name}", "warm", "product, warm cache (Redis)", s["warm"].base,
                f"{API}/items/{item0}", pid=s["warm"].pid, baseline="bare", product=True,
                note="one item, served from Redis", **common))
            rows["warm-2w"].append(Target(
                f"warm-2w@{v.name}", "warm-2w", "product, warm cache, 2 workers", s["warm2"].base,
                f"{API}/items/{item0}", pid=s["warm2"].pid, baseline=f"warm@{v.name}", product=True,
                note="atrium serve --workers 2, vs the one-worker row of the same mode", **common))
            rows["cold"].append(Target(
                f"cold@{v.name}", "cold", "product, cold (cache off: PostgreSQL)", s["cold"].base,
                f"{API}/items/", pid=s["cold"].pid, rotate=True, baseline="asyncpg", product=True,
                note=f"ATRIUM_CACHE_BACKEND=none, rotating over {c.items} items", **common))
            rows["cold-one-id"].append(Target(
                f"cold-one-id@{v.name}", "cold-one-id", "product, cold, one id (single flight)",
                s["cold"].base, f"{API}/items/{item0}", pid=s["cold"].pid, baseline="asyncpg",
                note="informational: concurrent misses on one key share one database read", **common))
            rows["post"].append(Target(
                f"post@{v.name}", "post", "product, POST /items", s["warm"].base, f"{API}/items",
                pid=s["warm"].pid, script=post_script, baseline="asyncpg-post", product=True,
                note="admin token, validate, insert, commit (ItemService.create writes no outbox row)",
                **common))
        groups = [
            [bare, *rows["warm"], *rows["warm-2w"]],
            [asyncpg, *rows["cold"], *rows["cold-one-id"]],
            [asyncpg_post, *rows["post"]],
        ]
        targets = [t for group in groups for t in group]
        self.check_same_bytes(targets)
        wrk = Wrk(wrk_binary, c.threads, c.connections, self.write_script())
        say(f"measuring {', '.join(v.label for v in variants)}: {c.rounds} round(s) x {c.duration:g} s per "
            f"target ({len(targets)} targets), wrk -t{c.threads} -c{c.connections}, interleaved")
        products = {f"{kind}@{v.name}": servers[v.name][kind].base
                    for v in variants for kind in ("warm", "cold")}
        self.measure(wrk, groups, products)
        if c.memory_requests:
            for v in variants:
                self.release_connections()
                mem = servers[v.name]["mem"]
                target = Target(f"mem@{v.name}", "mem", "product, warm cache (memory run)", mem.base,
                                f"{API}/items/{item0}", pid=mem.pid, mode=v.name, mode_label=v.label)
                self.memory[v.name] = self.measure_memory(wrk, target, mem)
        self.check_alive()
        exports = self.flush_exports(sink, servers, variants) if sink is not None else {}
        self.server_warnings = self.log_warnings()
        if sink is not None:
            self.tracing = self.tracing_summary(exports, sink, servers, variants, wrk)
        return self.report(targets, wrk, variants)

    # --tracing: the span sink, and what each variant exported to it

    def serve_sink(self) -> Server:
        """bench/otlp_sink.py: answers every export 200 and counts it, per variant's path."""
        port = free_port()
        argv = [str(self.python), str(ROOT / "bench" / "otlp_sink.py"), "--port", str(port)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ATRIUM_", "BENCH_"))}
        sink = Server(self.start("otlp-sink", argv, env), f"http://127.0.0.1:{port}")
        wait_ready(sink.proc, sink.base + "/counts", timeout=30.0)
        say(f"OTLP/HTTP span sink up: {sink.base} (POST /<variant>{TRACES_PATH})")
        return sink

    def flush_exports(
        self, sink: Server, servers: dict[str, dict[str, Server]], variants: Sequence[Variant]
    ) -> dict[str, Any]:
        """Stop the traced servers (each exports the spans still queued as it shuts down), then read
        the sink's counts and its own CPU time over the run."""
        procs = [s.proc for v in variants if v.sampling is not None for s in servers[v.name].values()]
        say(f"stopping the {len(procs)} traced servers, so their exporters flush; then reading the sink")
        for proc in procs:  # all at once, then each waited for
            with suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in procs:
            proc.stop()
        status, _, body = http("GET", sink.base + "/counts")
        if status != 200:
            raise BenchError(f"the span sink answered HTTP {status} for its counts:\n{sink.proc.tail()}")
        return {"counts": json.loads(body), "cpu_s": tree_cpu_seconds(sink.pid)}

    def tracing_summary(
        self, exports: dict[str, Any], sink: Server, servers: dict[str, dict[str, Server]],
        variants: Sequence[Variant], wrk: Wrk,
    ) -> dict[str, Any]:
        """Per variant: the export requests and bytes the sink received, the requests its servers
        served (every wrk run: warm-ups, priming, rounds, memory), and whether a server logged that
        its exporter's queue was full (spans dropped)."""
        counts: dict[str, dict[str, int]] = dict(exports["counts"])
        per_variant: dict[str, Any] = {}
        for v in variants:
            got = counts.pop(f"/{v.name}{TRACES_PATH}", {"requests": 0, "bytes": 0})
            served = sum(wrk.served.get(s.base, 0) for s in servers[v.name].values())
            dropped = sum(n for proc, messages in self.server_warnings.items()
                          if proc.startswith("product-") and proc.endswith(f"-{v.name}")
                          for message, n in messages.items() if "Queue full" in message)
            per_variant[v.name] = {
                "label": v.label,
                "sampling": v.sampling,
                "export_requests": got["requests"],
                "export_bytes": got["bytes"],
                "requests_served": served,
                "export_bytes_per_request": round(got["bytes"] / served, 1) if served else None,
                "queue_full_warnings": dropped,
            }
            say(f"{v.label}: {got['requests']:,} export request(s), {got['bytes']:,} bytes to the sink for "
                f"{served:,} requests served" + (f"; {dropped} 'queue full' warning(s): spans dropped"
                                                  if dropped else ""))
        cpu = exports["cpu_s"]
        say(f"span sink: {cpu if cpu is not None else '?'} s of CPU over the run"
            + (f"; unexpected paths: {counts}" if counts else ""))
        return {"mode": self.config.modes[0], "levels": list(self.config.tracing), "sink": sink.base,
                "sink_cpu_s": cpu, "other_paths": counts, "variants": per_variant, "control": self.control}

    def report(self, targets: list[Target], wrk: Wrk, variants: Sequence[Variant]) -> dict[str, Any]:
        c = self.config
        rows = [target_row(t) for t in targets]
        by_key = {row["key"]: row for row in rows}
        for row in rows:
            base = by_key.get(row["baseline"] or "")
            if base is not None:
                row["ratio"] = round(row["rps_median"] / base["rps_median"], 3)
                if row["cpu_us_per_request_median"] and base["cpu_us_per_request_median"]:
                    row["cpu_ratio"] = round(
                        row["cpu_us_per_request_median"] / base["cpu_us_per_request_median"], 3)
        side_by_side = []
        by_target = {t.key: t for t in targets}
        for kind in ("warm", "warm-2w", "cold", "cold-one-id", "post"):
            entry: dict[str, Any] = {"row": kind, "modes": {}}
            for v in variants:
                row = by_key[f"{kind}@{v.name}"]
                entry["target"], entry["baseline"] = row["target"], row["baseline"]
                entry["ratio_goal"] = row["ratio_goal"]
                entry["modes"][v.name] = {k: row[k] for k in ("ratio", "cpu_ratio", "rps_median",
                                                               "cpu_us_per_request_median", "errors")}
            if "on" in c.modes and "off" in c.modes:
                entry["on_vs_off"] = paired_gain(by_target[f"{kind}@on"], by_target[f"{kind}@off"])
            if c.tracing:
                off = f"{kind}@{Variant.traced(c.modes[0], TRACING_OFF, '').name}"
                entry["vs_tracing_off"] = {v.name: tracing_cost(by_target[f"{kind}@{v.name}"], by_target[off])
                                           for v in variants if v.sampling is not None}
                if c.control:  # what tracing off costs against the code before tracing
                    entry["off_vs_control"] = tracing_cost(by_target[off], by_target[f"{kind}@{CONTROL}"])
            side_by_side.append(entry)
        return {
            "checks": self.checks(rows, variants),
            "memory": self.memory,
            "benchmark": "GET and POST /api/v1/items",
            "kind": "modes",
            "started": self.started.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": "quick" if c.quick else "full",
            "modes": list(c.modes),
            "variant_names": [v.name for v in variants],
            "variants": self.variants,
            "tracing": self.tracing,
            "settings": {
                "rounds": c.rounds, "duration_s": c.duration, "warmup_s": c.warmup,
                "wrk_threads": c.threads, "wrk_connections": c.connections, "items": c.items,
                "product_profile": "production (PostgreSQL, Redis cache, Redis broker, Redis rate limiter), "
                                   "1 uvicorn worker (2 for the 2-worker row), per ATRIUM_FAST_PATH mode"
                                   + (f" ({c.modes[0]}), per tracing level (off: no ATRIUM_OTEL_*; on: "
                                      "ATRIUM_OTEL_EXPORTER_OTLP_ENDPOINT = the benchmark's OTLP/HTTP sink, "
                                      "ATRIUM_OTEL_SAMPLING_RATIO = the level)" if c.tracing else ""),
                "cpu": "user + system CPU time of the server's process tree over each wrk run "
                       "(/proc/<pid>/stat), divided by the requests wrk completed in it",
                "wrk_command": " ".join(wrk.argv(targets[1], c.duration)),
            },
            "cache_lookups_during_rounds": self.cache_checks,
            "server_warnings": self.server_warnings,
            "priming_errors": self.prime_errors,
            "machine": machine_facts(self.python),
            "side_by_side": side_by_side,
            "rows": rows,
        }

    def checks(self, rows: list[dict[str, Any]], variants: Sequence[Variant]) -> list[dict[str, Any]]:
        """The issue's targets for each variant, each PASS or FAIL with the figure it was judged on."""
        labels = {row["key"]: row["target"] for row in rows}
        checks: list[dict[str, Any]] = []
        for mode, tag in ((v.name, f" [{v.label}]") for v in variants):
            for row in rows:
                if row["mode"] == mode and row["ratio_goal"] is not None:
                    checks.append({"check": f"{row['target']}{tag}: req/s vs {labels[row['baseline']]}",
                                   "mode": mode, "goal": f">= {row['ratio_goal']:.2f}x",
                                   "value": f"{row['ratio']:.2f}x",
                                   "pass": row["ratio"] >= row["ratio_goal"] and not row["errors"]})
            for row in rows:
                if row["mode"] == mode and row["product"]:
                    checks.append({"check": f"{row['target']}{tag}: p99 / p50", "mode": mode,
                                   "goal": f"<= {P99_OVER_P50_MAX:g}", "value": f"{row['p99_over_p50']:.2f}",
                                   "pass": row["p99_over_p50"] <= P99_OVER_P50_MAX})
            memory = self.memory.get(mode)
            if memory:
                first, second = memory["milestones"]
                scaled = " (quick: scaled down)" if self.config.quick else ""
                peak = max(first["hwm_mb"], second["hwm_mb"])
                checks.append({"check": f"peak RSS of the API worker, {second['requests']:,} warm GETs"
                                        f"{scaled}{tag}", "mode": mode,
                               "goal": f"<= {PEAK_RSS_MAX_MB:g} MB", "value": f"{peak:.1f} MB",
                               "pass": peak <= PEAK_RSS_MAX_MB})
                growth = second["rss_mb"] - first["rss_mb"]
                checks.append({"check": f"RSS growth from {first['requests']:,} to {second['requests']:,} "
                                        f"warm GETs{scaled}{tag}", "mode": mode,
                               "goal": f"<= {RSS_GROWTH_MAX_MB:g} MB", "value": f"{growth:+.1f} MB",
                               "pass": growth <= RSS_GROWTH_MAX_MB})
        return checks

    # --pieces: what each piece buys, against all on, interleaved with all on and all off

    def run_pieces(self, wrk_binary: str, password: str) -> dict[str, Any]:
        c = self.config
        on, off = Variant.mode("on"), Variant.mode("off")
        variants = [on, off, *(Variant.without(p) for p in c.pieces)]
        self.check_variants(variants, strict=True)
        servers = self.start_products(variants, ["warm", "cold"])
        self.seed_apart(password, on)
        post_script = self.write_post_script()
        item0 = self.item_ids[0]
        groups: list[list[Target]] = [[], [], []]
        for v in variants:
            s = servers[v.name]
            common = {"mode": v.name, "mode_label": v.label, "product": True}
            groups[0].append(Target(f"warm@{v.name}", "warm", "product, warm cache (Redis)", s["warm"].base,
                                    f"{API}/items/{item0}", pid=s["warm"].pid, **common))
            groups[1].append(Target(f"cold@{v.name}", "cold", "product, cold (cache off: PostgreSQL)",
                                    s["cold"].base, f"{API}/items/", pid=s["cold"].pid, rotate=True,
                                    **common))
            groups[2].append(Target(f"post@{v.name}", "post", "product, POST /items", s["warm"].base,
                                    f"{API}/items", pid=s["warm"].pid, script=post_script, **common))
        targets = [t for group in groups for t in group]
        self.check_same_bytes(targets)
        wrk = Wrk(wrk_binary, c.threads, c.connections, self.write_script())
        say(f"measuring pieces {', '.join(c.pieces)}: {len(variants)} server variants x 3 rows, "
            f"{c.rounds} round(s) x {c.duration:g} s per target, wrk -t{c.threads} -c{c.connections}, "
            "interleaved")
        products = {f"{kind}@{v.name}": servers[v.name][kind].base
                    for v in variants for kind in ("warm", "cold")}
        self.measure(wrk, groups, products)
        self.check_alive()
        self.server_warnings = self.log_warnings()

        by_key = {t.key: t for t in targets}
        row_kinds = [g[0].row for g in groups]

        def gains(with_it: str, without_it: str) -> dict[str, Any]:
            return {kind: paired_gain(by_key[f"{kind}@{with_it}"], by_key[f"{kind}@{without_it}"])
                    for kind in row_kinds}

        pieces = []
        for piece in c.pieces:
            per_row = gains("on", f"skip-{piece}")
            over: dict[str, list[str]] = {}  # row -> the measures on which the piece clears the bar
            for kind, g in per_row.items():
                for label, value in (("req/s", g["rps_gain_pct"]), ("CPU/req", g["cpu_saved_pct"])):
                    if value is not None and value >= PIECE_BAR_PCT:
                        over.setdefault(kind, []).append(f"{label} {value:+.1f} %")
            where = "; ".join(f"{ROW_NAMES.get(k, k)} ({', '.join(items)})" for k, items in over.items())
            pieces.append({"piece": piece, "rows": per_row, "keeps": bool(over),
                           "verdict": f">= {PIECE_BAR_PCT:g} % on {where}" if over
                           else f"< {PIECE_BAR_PCT:g} % on every row"})
        return {
            "benchmark": "fast path pieces: GET and POST /api/v1/items",
            "kind": "pieces",
            "started": self.started.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": "quick" if c.quick else "full",
            "variants": self.variants,
            "settings": {
                "rounds": c.rounds, "duration_s": c.duration, "warmup_s": c.warmup,
                "wrk_threads": c.threads, "wrk_connections": c.connections, "items": c.items,
                "product_profile": "production (PostgreSQL, Redis cache, Redis broker, Redis rate limiter), "
                                   "1 uvicorn worker, per variant: ATRIUM_FAST_PATH=on, off, and on with "
                                   "ATRIUM_FAST_PATH_SKIP=<piece>",
                "bar_pct": PIECE_BAR_PCT,
                "cpu": "user + system CPU time of the server's process tree over each wrk run "
                       "(/proc/<pid>/stat), divided by the requests wrk completed in it",
                "wrk_command": " ".join(wrk.argv(targets[0], c.duration)),
            },
            "whole_fast_path": gains("on", "off"),
            "pieces": pieces,
            "cache_lookups_during_rounds": self.cache_checks,
            "server_warnings": self.server_warnings,
            "priming_errors": self.prime_errors,
            "machine": machine_facts(self.python),
            "rows": [target_row(t) for t in targets],
        }

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning up
                say(f"could not stop {proc.name}: {exc}")
        if self.control is not None:  # the worktree (its venv goes with the temporary directory)
            removed = subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                      self.control["checkout"]], capture_output=True, text=True)
            if removed.returncode != 0:
                say(f"could not remove the control's worktree: {removed.stderr.strip()}")
        if self.database_created:
            try:
                pg_execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                say(f"database {self.database} dropped")
            except Exception as exc:
                say(f"could not drop database {self.database}: {exc}")
        try:
            deleted = redis_delete_namespace(self.namespace)
            say(f"redis: {deleted} key(s) under {self.namespace} deleted")
        except Exception as exc:
            say(f"could not delete redis keys under {self.namespace}: {exc}")
        if self.config.keep_logs:
            say(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def worker_pid(pid: int) -> int:
    """The process serving requests: ``pid`` itself, or its child when uvicorn forked one."""
    with suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
    return pid


def rss_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of ``pid`` in MB, from /proc/<pid>/status."""
    figures = {"rss_mb": 0.0, "hwm_mb": 0.0}
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures["rss_mb" if name == "VmRSS" else "hwm_mb"] = round(int(value.split()[0]) / 1024, 1)
    return figures


def _version(argv: Sequence[str]) -> str:
    with suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
        return (result.stdout or result.stderr).strip().splitlines()[0]
    return "unknown"


_PACKAGES = ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "sqlalchemy", "asyncpg",
             "redis", "hiredis")


def machine_facts(python: Path) -> dict[str, Any]:
    packages = _version([str(python), "-c", (
        "import importlib.metadata as m, json\n"
        "def v(p):\n"
        "    try:\n"
        "        return m.version(p)\n"
        "    except m.PackageNotFoundError:\n"
        "        return 'missing'\n"
        f"print(json.dumps({{p: v(p) for p in {_PACKAGES!r}}}))")])
    try:
        versions = json.loads(packages)
    except ValueError:
        versions = {"error": packages}
    load = os.getloadavg()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "loadavg_at_end": [round(x, 2) for x in load],
        "os": platform.platform(),
        "python": _version([str(python), "--version"]),
        "packages": versions,
        "postgresql": str(_safe(lambda: pg_execute("SHOW server_version"))),
        "redis": str(_safe(lambda: redis_client().info("server").get("redis_version"))),
        "wrk": _version(["wrk", "--version"]),
        "git": _version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
    }


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} µs"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f} %"


def _cpu_range(row: dict[str, Any]) -> str:
    if row["cpu_us_per_request_median"] is None:
        return "-"
    return (f"{row['cpu_us_per_request_median']:,.0f} µs "
            f"({row['cpu_us_per_request_min']:,.0f}-{row['cpu_us_per_request_max']:,.0f})")


def _footer(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    lines: list[str] = []
    checks = result.get("cache_lookups_during_rounds") or {}
    if checks:
        lines += ["", "Cache lookups during the rounds, priming bursts included (product `/metrics`): "
                  + "; ".join(
            f"{key}: " + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(vals.items()) if v) or "none")
            for key, vals in checks.items())]
    warnings = result.get("server_warnings") or {}
    if warnings:
        lines += ["", "Warnings and errors in the servers' logs (a row whose server failed open or answered "
                  "errors is not comparable): " + "; ".join(
                      f"{server}: " + ", ".join(f"{n:,} x {message}" for message, n in messages.items())
                      for server, messages in warnings.items()) + "."]
    priming = result.get("priming_errors") or {}
    if priming:
        lines += ["", "Errors in the unmeasured priming bursts (pools reconnecting): " + ", ".join(
            f"{key} {count:,}" for key, count in priming.items()) + "."]
    variants = result.get("variants") or {}
    if variants:
        lines += ["", "Fast path pieces per server variant (asked of the product's settings): " + "; ".join(
            f"{v['label']} ({' '.join(f'{k}={x}' for k, x in v['env'].items())}): "
            + (f"{', '.join(v['pieces']) or 'none'}" if v["pieces"] is not None
             else f"those of commit {str(v.get('commit'))[:12]}") for v in variants.values()) + "."]
    lines += [
        "",
        f"Machine: {m['nproc']} CPU(s), {m['cpu']}; {m['python']}; {m['os']}; load average at end "
        f"{', '.join(map(str, m['loadavg_at_end']))}; PostgreSQL {m['postgresql']}, Redis {m['redis']}; "
        f"{m['wrk']}.",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ".",
        f"Commit {m['git']}, {m['date']}. wrk, the servers, PostgreSQL and Redis share the machine.",
        "",
    ]
    return lines


def markdown(result: dict[str, Any]) -> str:
    return markdown_pieces(result) if result.get("kind") == "pieces" else markdown_modes(result)


def markdown_modes(result: dict[str, Any]) -> str:
    s = result["settings"]
    modes = result.get("variant_names") or result.get("modes") or ["on"]
    tracing = result.get("tracing")
    labels = {row["key"]: row["target"] + (f" [{row['mode']}]" if row.get("mode") else "")
              for row in result["rows"]}
    if tracing:
        levels = ", ".join(level if level == TRACING_OFF else f"{level} %" for level in tracing["levels"])
        title = f"product (fast path {tracing['mode']}; tracing {levels}) vs bare FastAPI"
        per = f"once per tracing level (fast path {tracing['mode']})"
    else:
        title = f"product (fast path {' and '.join(modes)}) vs bare FastAPI"
        per = "once per `ATRIUM_FAST_PATH` mode"
    lines = [
        f"## {result['benchmark']}: {title} ({result['mode']} run)",
        "",
        "Production profile, one uvicorn worker per server (two for the 2-worker row), the product's "
        f"servers {per}; `wrk -t{s['wrk_threads']} -c{s['wrk_connections']} "
        f"-d{s['duration_s']:g}s --latency`, {s['rounds']} round(s) per target, interleaved (a baseline "
        f"and its product rows of every variant back to back) after a {s['warmup_s']:g} s warm-up; medians "
        "over rounds. CPU/req: user + system CPU time of the server's process tree (uvicorn's master "
        "and workers) over each run, divided by the requests completed in it.",
        *(_tracing_table(result) if tracing else []),
        "",
        f"| target | {'server' if tracing else 'fast path'} | req/s (median) | req/s min-max "
        "| CPU/req (min-max) | p50 | p99 | p99/p50 | ratio vs baseline | CPU/req vs baseline | goal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for row in result["rows"]:
        ratio = "baseline" if row["ratio"] is None else f"{row['ratio']:.2f}x {labels[row['baseline']]}"
        cpu_ratio = "" if row["baseline"] is None else _x(row.get("cpu_ratio"))
        errors = f" ⚠ {row['errors']} errors" if row["errors"] else ""
        goal = ""
        if row.get("ratio_goal") is not None:
            verdict = "PASS" if row["ratio"] >= row["ratio_goal"] else "FAIL"
            goal = f">= {row['ratio_goal']:.2f}x: {verdict}"
        lines.append(
            f"| {row['target']}{errors} | {row.get('mode') or '-'} | {row['rps_median']:,.0f} "
            f"| {row['rps_min']:,.0f}-{row['rps_max']:,.0f} | {_cpu_range(row)} "
            f"| {row['p50_ms_median']:.2f} ms | {row['p99_ms_median']:.2f} ms | {row['p99_over_p50']:.2f} "
            f"| {ratio} | {cpu_ratio} | {goal} |"
        )
    side = result.get("side_by_side") or []
    if side:
        both = "on" in modes and "off" in modes
        head = ["row", "vs"]
        head += [f"req/s ratio, {m}" for m in modes] + [f"CPU/req ratio, {m}" for m in modes]
        head += [f"CPU/req, {m}" for m in modes]
        if both:
            head += ["on vs off: req/s", "on vs off: CPU/req saved"]
        head.append("goal (req/s ratio)")
        each = "tracing level" if tracing else "mode"
        lines += ["", f"Side by side: each {each} against the same-run baseline (req/s ratio: higher is "
                  "better; CPU/req ratio: the product's CPU per request over the baseline's, lower is better)"
                  + ("; on vs off: medians over rounds of each round's on/off pair." if both else "."),
                  "", "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 3) + "---|"]
        for entry in side:
            per = entry["modes"]
            vs = (f"{labels[entry['baseline']].rsplit(' [', 1)[0]}, same {each}" if entry["row"] == "warm-2w"
                  else labels[entry["baseline"]])
            cells = [entry["target"], vs]
            cells += [_x(per[m]["ratio"]) + (" ⚠" if per[m]["errors"] else "") for m in modes]
            cells += [_x(per[m]["cpu_ratio"]) for m in modes]
            cells += [_us(per[m]["cpu_us_per_request_median"]) for m in modes]
            if both:
                cells += [_pct(entry["on_vs_off"]["rps_gain_pct"]), _pct(entry["on_vs_off"]["cpu_saved_pct"])]
            cells.append(f">= {entry['ratio_goal']:.2f}x" if entry.get("ratio_goal") is not None else "")
            lines.append("| " + " | ".join(cells) + " |")
    variant_labels = {name: v["label"] for name, v in (result.get("variants") or {}).items()}
    for mode, memory in (result.get("memory") or {}).items():
        lines += ["", f"Memory run, {variant_labels.get(mode, f'fast path {mode}')} (a fresh one-worker "
                  "product, warm GETs; "
                  f"pid {memory['pid']}): at start VmRSS {memory['start']['rss_mb']:.1f} MB; " + "; ".join(
                      f"after {m['requests']:,} requests VmRSS {m['rss_mb']:.1f} MB, "
                      f"VmHWM {m['hwm_mb']:.1f} MB"
                      for m in memory["milestones"]) + "."]
    lines += ["", "| target (issue \"Performance\") | goal | measured | result |", "|---|---|---|---|"]
    for check in result.get("checks", []):
        lines.append(f"| {check['check']} | {check['goal']} | {check['value']} | "
                     f"{'PASS' if check['pass'] else 'FAIL'} |")
    return "\n".join(lines + _footer(result))


def _tracing_table(result: dict[str, Any]) -> list[str]:
    """--tracing: per level, the rows' ratios to their baselines, the product's CPU per request, what
    tracing costs against tracing off in the same rounds, and what reached the span sink."""
    tracing = result["tracing"]
    side = {entry["row"]: entry for entry in result["side_by_side"]}
    kinds = [k for k in ("warm", "cold", "post") if k in side]
    names = " / ".join(ROW_NAMES[k] for k in kinds)
    baselines = {"bare": "bare FastAPI", "asyncpg": "raw asyncpg", "asyncpg-post": "raw asyncpg POST"}
    head = ["tracing", *(f"{ROW_NAMES[k]} vs {baselines.get(side[k]['baseline'], side[k]['baseline'])}"
                         for k in kinds),
            f"CPU/req, {names}", f"CPU/req vs tracing off, {names}", f"req/s vs tracing off, {names}",
            "exports to the sink: requests, bytes (per request served)"]
    lines = [
        "",
        f"**Tracing**, fast path {tracing['mode']}: each level against the same-run baselines (req/s ratio), "
        "the product's CPU µs per request, and against tracing off in the same rounds (medians over "
        "rounds of each round's traced/off pair; CPU above 1.00x and req/s below it is what tracing "
        "costs). Traced servers export over OTLP/HTTP (protobuf, the SDK's batch processor) to "
        "the benchmark's sink (`bench/otlp_sink.py`), which answers 200 and drops the payload; the "
        "export counts cover every request a variant's servers served (warm-ups, priming, rounds, "
        "memory run). A request is sampled at the edge; an unsampled one runs untraced (no SERVER span, "
        "the instrumentations suppressed, the fast path's direct statements on), a sampled one pays for "
        "every span and takes SQLAlchemy's path for its statements (core/fastpath/README.md).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for name in result.get("variant_names") or []:
        got = tracing["variants"][name]
        per = {k: side[k]["modes"][name] for k in kinds}
        cost = {k: (side[k].get("vs_tracing_off") or {}).get(name) for k in kinds}
        traced = got["sampling"] is not None
        level = f"{got['sampling'] * 100:g} %" if traced else TRACING_OFF
        if name == CONTROL:
            level = f"off, at {tracing['control']['commit'][:8]} (control)"
        cells = [level]
        cells += [_x(per[k]["ratio"]) + (" ⚠" if per[k]["errors"] else "") for k in kinds]
        cells.append(" / ".join(_us(per[k]["cpu_us_per_request_median"]).removesuffix(" µs") for k in kinds)
                     + " µs")
        cells.append(" / ".join(_x(cost[k]["cpu_ratio"]) if cost[k] else "-" for k in kinds))
        cells.append(" / ".join(_x(cost[k]["rps_ratio"]) if cost[k] else "-" for k in kinds))
        exported = f"{got['export_requests']:,}, {_bytes(got['export_bytes'])}"
        if got["export_bytes_per_request"] is not None:
            exported += f" ({got['export_bytes_per_request']:,.0f} B/req)"
        if got["queue_full_warnings"]:
            exported += " ⚠ exporter queue full: spans dropped"
        cells.append(exported)
        lines.append("| " + " | ".join(cells) + " |")
    cpu = tracing["sink_cpu_s"]
    other = f"; requests to other paths: {tracing['other_paths']}" if tracing["other_paths"] else ""
    lines += ["", f"The sink's own CPU over the whole run: {'-' if cpu is None else f'{cpu:.2f} s'}{other}."]
    control = tracing.get("control")
    if control:
        against = {k: side[k].get("off_vs_control") for k in kinds}
        cpu_cells = " / ".join(_x(against[k]["cpu_ratio"]) if against[k] else "-" for k in kinds)
        rps_cells = " / ".join(_x(against[k]["rps_ratio"]) if against[k] else "-" for k in kinds)
        rounds = "; ".join(
            f"{ROW_NAMES[k]} " + ", ".join(f"{x:.2f}" for x in against[k]["rounds_cpu_ratio"])
            for k in kinds if against[k])
        lines += ["", f"**Tracing off against the code before tracing** (control: commit "
                  f"{control['commit'][:12]}, `--control {control['rev']}`, served from its own checkout and "
                  "virtualenv on the same database, in the same rounds): CPU/req of tracing off over the "
                  f"control's, {names}: {cpu_cells} (each round: {rounds}); req/s: {rps_cells}. Medians "
                  "over rounds of each round's pair; 1.00x is no cost."]
    return lines


def _bytes(value: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def markdown_pieces(result: dict[str, Any]) -> str:
    s = result["settings"]
    kinds = list(result["whole_fast_path"])
    names = ROW_NAMES
    lines = [
        f"## Fast path pieces: what each buys on GET and POST /api/v1/items ({result['mode']} run)",
        "",
        "Production profile, one uvicorn worker per server; per row, servers with `ATRIUM_FAST_PATH=on`, "
        "`=off`, and `=on` with `ATRIUM_FAST_PATH_SKIP=<piece>` for each piece, measured back to back "
        f"in every round; `wrk -t{s['wrk_threads']} -c{s['wrk_connections']} -d{s['duration_s']:g}s`, "
        f"{s['rounds']} round(s) after a {s['warmup_s']:g} s warm-up. A piece's gain on a row is the "
        "median over rounds of that round's all-on vs on-without-the-piece pair: req/s = "
        "req/s(all on) / req/s(without) - 1; CPU/req = 1 - CPU µs/req(all on) / CPU µs/req(without); "
        f"positive = the piece pays. Bar: a piece that buys < {s['bar_pct']:g} % on every row (req/s "
        "and CPU/req) goes.",
    ]
    if s["rounds"] < 3:
        lines += ["", f"**{s['rounds']} round(s) only: single runs on this machine move by 20-50 %, so these "
                  "verdicts are noise, not decisions.**"]
    head = ["piece", *(f"{names.get(k, k)}: {what}" for k in kinds for what in ("req/s", "CPU/req")),
            "verdict"]
    lines += ["", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]

    def cells(rows: dict[str, Any]) -> list[str]:
        out = []
        for k in kinds:
            warn = " ⚠" if rows[k]["errors"] else ""
            out += [_pct(rows[k]["rps_gain_pct"]) + warn, _pct(rows[k]["cpu_saved_pct"]) + warn]
        return out

    for piece in result["pieces"]:
        verdict = ("keep: " if piece["keeps"] else "goes: ") + piece["verdict"]
        lines.append("| " + " | ".join([f"`{piece['piece']}`", *cells(piece["rows"]), verdict]) + " |")
    whole = ["whole fast path (on vs off)", *cells(result["whole_fast_path"]), ""]
    lines.append("| " + " | ".join(whole) + " |")
    lines += ["", "| target | server | req/s (median) | req/s min-max | CPU/req (min-max) | p50 | p99 |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        errors = f" ⚠ {row['errors']} errors" if row["errors"] else ""
        lines.append(f"| {row['target']}{errors} | {row['mode_label']} | {row['rps_median']:,.0f} "
                     f"| {row['rps_min']:,.0f}-{row['rps_max']:,.0f} | {_cpu_range(row)} "
                     f"| {row['p50_ms_median']:.2f} ms | {row['p99_ms_median']:.2f} ms |")
    return "\n".join(lines + _footer(result))


@contextmanager
def interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every ``finally`` runs."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ensure_dependencies() -> None:
    """Run under the venv's python when this one lacks the project's asyncpg and redis."""
    try:
        import asyncpg  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        python = venv_python()
        in_venv = Path(sys.prefix).resolve() == venv_dir().resolve()
        if not in_venv and python.exists() and not os.environ.get("BENCH_REEXEC"):
            os.environ["BENCH_REEXEC"] = "1"
            os.execv(python, [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])
        raise SystemExit(
            f"bench: error: {exc.name} is missing from {sys.executable}; run scripts/bench, or "
            "bench/run.py with the project's venv python (ATRIUM_VENV, default .venv)"
        ) from None


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    ensure_dependencies()
    bench = Bench(config)
    say(f"python {bench.python}; results to {config.output}.md/.json")
    with interrupts_as_keyboard_interrupt():
        try:
            result = bench.run()
        except BenchError as exc:
            print(f"bench: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:
            print(f"bench: interrupted{f' ({exc})' if str(exc) else ''}", file=sys.stderr)
            return 130
        finally:
            # A second Ctrl-C (or SIGTERM, SIGHUP) must not leave a database or servers behind;
            # cleanup is bounded.
            stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops}
            try:
                bench.cleanup()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")  # first: kept
    text = markdown(result)
    config.output.with_suffix(".md").write_text(text)
    print()
    print(text)
    say(f"written {config.output.with_suffix('.md')} and {config.output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
