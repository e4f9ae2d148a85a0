#!/usr/bin/env python3
"""Benchmark ``GET /api/v1/items/{id}`` and ``POST /api/v1/items`` on the production profile
against bare FastAPI baselines, plus 2 workers vs 1 and the worker's memory after 100k/200k requests.

Everything it needs it builds, and everything it builds it removes (in ``finally``, Ctrl-C
included): a private PostgreSQL database ``atrium_bench_<random>``, Redis keys under a private
namespace, four product servers (cache on, cache off, two workers, a fresh one for the memory
run), one baseline server and their logs. The issue's targets are printed as PASS/FAIL.

    python bench/run.py            # 3 rounds x 10 s per target + the memory run (about 10 minutes)
    python bench/run.py --quick    # smoke: 1 round x 2 s per target, memory run scaled down

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

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
API = "/api/v1"
ADMIN_EMAIL = "bench-admin@example.com"


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


def pg_execute(sql: str, database: str = "postgres") -> Any:
    import asyncpg

    async def run() -> Any:
        conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)
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

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv), cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
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


def wait_ready(proc: Proc, url: str, timeout: float = 60.0) -> None:
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

# The targets: a row's req/s over its baseline's, at least this much.
RATIO_GOALS = {"warm": 0.60, "cold": 0.75, "post": 0.70, "warm-2w": 1.70}
P99_OVER_P50_MAX = 3.0
PEAK_RSS_MAX_MB = 150.0
RSS_GROWTH_MAX_MB = 2.0  # "no growth" between the two milestones, within allocator noise


@dataclass
class Target:
    key: str
    label: str
    base: str  # http://127.0.0.1:port
    path: str  # a fixed path, or a prefix the rotation script appends ids to
    rotate: bool = False
    baseline: str | None = None  # key of the target this one is compared with
    note: str = ""
    script: Path | None = None  # a wrk Lua script of its own (POST)
    product: bool = False  # a product row: its p99/p50 is held to the target
    samples: list[Sample] = field(default_factory=list)


class Wrk:
    def __init__(self, binary: str, threads: int, connections: int, script: Path) -> None:
        self.binary = binary
        self.threads = threads
        self.connections = connections
        self.script = script

    def argv(self, target: Target, seconds: float) -> list[str]:
        argv = [self.binary, f"-t{self.threads}", f"-c{self.connections}", f"-d{seconds:g}s",
                "--latency", "--timeout", "10s"]
        if target.rotate:
            return [*argv, "-s", str(self.script), target.base + "/", "--", target.path]
        if target.script is not None:
            return [*argv, "-s", str(target.script), target.base + target.path]
        return [*argv, target.base + target.path]

    def run(self, target: Target, seconds: float) -> Sample:
        result = subprocess.run(
            self.argv(target, seconds), capture_output=True, text=True, timeout=seconds + 60,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0:
            raise BenchError(f"wrk failed on {target.label}: {result.stderr or result.stdout}")
        return parse_wrk(result.stdout)


# --- the run --------------------------------------------------------------------------------


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


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="GET and POST /api/v1/items on the production profile vs bare FastAPI baselines.",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1 round x 2 s per target")
    parser.add_argument("--rounds", type=int, help="rounds per target (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10; quick 2)")
    parser.add_argument("--warmup", type=float, help="seconds of wrk warm-up per target (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--items", type=int, help="items the cold rows rotate over (default 256; quick 128)")
    parser.add_argument("--output", type=Path,
                        help="results path without suffix (default bench/results/latest; quick: .../quick)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs (path printed)")
    parser.add_argument("--memory-requests", type=int,
                        help="RSS read after this many warm GETs and twice as many (default 100000; "
                             "quick 10000; 0 skips the memory run)")
    args = parser.parse_args(argv)
    quick = args.quick
    config = Config(
        rounds=args.rounds or (1 if quick else 3),
        duration=args.duration or (2.0 if quick else 10.0),
        warmup=args.warmup if args.warmup is not None else (1.0 if quick else 3.0),
        threads=args.threads,
        connections=args.connections,
        items=args.items or (128 if quick else 256),
        quick=quick,
        output=args.output or RESULTS / ("quick" if quick else "latest"),
        keep_logs=args.keep_logs,
        memory_requests=(args.memory_requests if args.memory_requests is not None
                         else (10_000 if quick else 100_000)),
    )
    if config.rounds < 1 or config.duration <= 0 or config.threads < 1 or config.connections < config.threads:
        parser.error("rounds >= 1, duration > 0, threads >= 1 and connections >= threads are required")
    if config.items < config.threads:
        parser.error("--items must be at least --threads")
    return config


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
        self.memory: dict[str, Any] = {}
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
            BENCH_PG_DSN=f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{self.database}",
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, argv, env, self.workdir)
        self.procs.append(proc)
        return proc

    # steps

    def preflight(self) -> str:
        wrk = find_wrk()
        if not port_open(PG_HOST, PG_PORT):
            raise BenchError(f"PostgreSQL does not answer on {PG_HOST}:{PG_PORT} (try scripts/services)")
        if not port_open("127.0.0.1", 6379):
            raise BenchError("Redis does not answer on 127.0.0.1:6379 (try scripts/services)")
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

    def serve_product(self, name: str, port: int, env: dict[str, str], workers: int = 1) -> Proc:
        argv = [*atrium_command(self.python), "serve", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers)]
        return self.start(name, argv, env)

    def serve_baseline(self, port: int) -> Proc:
        # The same uvicorn options as `atrium serve` (main._dispatch): one worker, loop and http
        # left at "auto" (uvloop + httptools from uvicorn[standard]), no access log, no Server
        # header, proxy headers on.
        argv = [str(self.python), "-m", "uvicorn", "bench.baseline_app:app", "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log",
                "--no-server-header", "--proxy-headers"]
        return self.start("baseline", argv, self.baseline_env())

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
                    raise BenchError(f"{target.label}: POST answered HTTP {status} {body[:300]!r}")
                continue
            url = target.base + (target.path + self.item_ids[0] if target.rotate else target.path)
            status, _, body = http("GET", url)
            if status != 200 or body != self.item_json:
                raise BenchError(f"{target.label} answers differently from the product:\n"
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

    def measure_memory(self, wrk: Wrk, target: Target, proc: Proc) -> None:
        """RSS of a fresh one-worker product after N and 2N warm GETs (wrk in chunks until each
        milestone is passed; the count is wrk's, so a milestone is overshot by under one chunk)."""
        c = self.config
        first = c.memory_requests
        chunk = 2.0 if c.quick else 5.0
        pid = worker_pid(proc.popen.pid)
        figures: dict[str, Any] = {"pid": pid, "start": rss_mb(pid), "milestones": []}
        done = 0
        say(f"memory: {first:,} then {2 * first:,} warm GETs on a fresh server (pid {pid})")
        for milestone in (first, 2 * first):
            while done < milestone:
                sample = wrk.run(target, chunk)
                if sample.errors:
                    raise BenchError(f"memory run: {target.label} answered errors: {sample}")
                done += sample.requests
            figures["milestones"].append({"requests": done, **rss_mb(pid)})
            say(f"memory: after {done:,} requests VmRSS {figures['milestones'][-1]['rss_mb']:.1f} MB, "
                f"VmHWM {figures['milestones'][-1]['hwm_mb']:.1f} MB")
        self.memory = figures

    def measure(self, wrk: Wrk, targets: list[Target], products: dict[str, str]) -> None:
        c = self.config
        for target in targets:
            say(f"warming {target.label} ({c.warmup:g} s)")
            if c.warmup > 0:
                sample = wrk.run(target, c.warmup)
                if sample.errors:
                    raise BenchError(f"{target.label} failed during warm-up: {sample}")
        before = {key: cache_counters(base) for key, base in products.items()}
        for r in range(c.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for target in order:
                sample = wrk.run(target, c.duration)
                target.samples.append(sample)
                flag = f"  ERRORS: {sample.errors}" if sample.errors else ""
                say(f"round {r + 1}/{c.rounds} {target.label:<44} {sample.rps:>9.0f} req/s  "
                    f"p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:7.2f} ms{flag}")
        for key, base in products.items():
            after = cache_counters(base)
            self.cache_checks[key] = {k: after.get(k, 0.0) - before[key].get(k, 0.0) for k in after}

    def run(self) -> dict[str, Any]:
        c = self.config
        wrk_binary = self.preflight()
        self.create_database()
        warm_env = self.product_env()
        password = self.prepare_schema(warm_env)
        cold_env = self.product_env(ATRIUM_CACHE_BACKEND="none")
        ports = {name: free_port() for name in ("warm", "cold", "warm2", "mem", "baseline")}
        warm = self.serve_product("product-warm", ports["warm"], warm_env)
        cold = self.serve_product("product-cold", ports["cold"], cold_env)
        warm2 = self.serve_product("product-warm-2w", ports["warm2"], warm_env, workers=2)
        mem = self.serve_product("product-mem", ports["mem"], warm_env) if c.memory_requests else None
        base = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        wait_ready(warm, base["warm"] + "/health/ready")
        wait_ready(cold, base["cold"] + "/health/ready")
        wait_ready(warm2, base["warm2"] + "/health/ready")
        if mem is not None:
            wait_ready(mem, base["mem"] + "/health/ready")
        self.seed(base["warm"], password)
        baseline = self.serve_baseline(ports["baseline"])
        wait_ready(baseline, f"{base['baseline']}/items/{self.item_ids[0]}")
        say("servers up: product (cache on) :{warm}, product (cache off) :{cold}, product 2 workers "
            ":{warm2}, product for the memory run :{mem}, baselines :{baseline}".format(**ports))
        post_script = self.write_post_script()

        item0 = self.item_ids[0]
        targets = [
            Target("bare", "bare FastAPI (same payload)", base["baseline"], f"/items/{item0}",
                   note="fixed pydantic model, no middleware, no DI, no I/O"),
            Target("warm", "product, warm cache (Redis)", base["warm"], f"{API}/items/{item0}",
                   baseline="bare", note="one item, served from Redis", product=True),
            Target("warm-2w", "product, warm cache, 2 workers", base["warm2"], f"{API}/items/{item0}",
                   baseline="warm", note="atrium serve --workers 2, vs the one-worker row", product=True),
            Target("asyncpg", "raw asyncpg FastAPI", base["baseline"], "/db/items/", rotate=True,
                   note=f"one SELECT by primary key per request, rotating over {c.items} items"),
            Target("cold", "product, cold (cache off: PostgreSQL)", base["cold"], f"{API}/items/",
                   rotate=True, baseline="asyncpg", product=True,
                   note=f"ATRIUM_CACHE_BACKEND=none, rotating over {c.items} items"),
            Target("cold-one-id", "product, cold, one id (single flight)", base["cold"],
                   f"{API}/items/{item0}", baseline="asyncpg",
                   note="informational: concurrent misses on one key share one database read"),
            Target("asyncpg-post", "raw asyncpg FastAPI, POST", base["baseline"], "/db/items",
                   script=post_script, note="validate, one INSERT in one transaction, commit, 201"),
            Target("post", "product, POST /items", base["warm"], f"{API}/items", script=post_script,
                   baseline="asyncpg-post", product=True,
                   note="admin token, validate, insert, commit (ItemService.create writes no outbox row)"),
        ]
        self.check_same_bytes(targets)
        wrk = Wrk(wrk_binary, c.threads, c.connections, self.write_script())
        say(f"measuring: {c.rounds} round(s) x {c.duration:g} s per target, "
            f"wrk -t{c.threads} -c{c.connections}, targets in alternation")
        self.measure(wrk, targets, {"warm": base["warm"], "cold": base["cold"]})
        if mem is not None:
            self.measure_memory(wrk, Target("mem", "product, warm cache (memory run)", base["mem"],
                                            f"{API}/items/{item0}"), mem)
        for proc in self.procs:
            if not proc.alive():
                raise BenchError(f"{proc.name} died during the run:\n{proc.tail()}")
        return self.report(targets, wrk)

    # results

    def report(self, targets: list[Target], wrk: Wrk) -> dict[str, Any]:
        c = self.config
        rows: list[dict[str, Any]] = []
        medians: dict[str, float] = {}
        for t in targets:
            rps = [s.rps for s in t.samples]
            medians[t.key] = statistics.median(rps)
            rows.append({
                "key": t.key,
                "target": t.label,
                "url": t.base + t.path + ("<id>" if t.rotate else ""),
                "note": t.note,
                "rps_median": round(medians[t.key], 1),
                "rps_min": round(min(rps), 1),
                "rps_max": round(max(rps), 1),
                "p50_ms_median": round(statistics.median(s.p50_ms for s in t.samples), 3),
                "p99_ms_median": round(statistics.median(s.p99_ms for s in t.samples), 3),
                "p99_over_p50": round(statistics.median(s.p99_ms / max(s.p50_ms, 1e-9) for s in t.samples),
                                      2),
                "product": t.product,
                "baseline": t.baseline,
                "ratio": None,
                "ratio_goal": RATIO_GOALS.get(t.key),
                "errors": sum(s.errors for s in t.samples),
                "rounds": [asdict(s) for s in t.samples],
            })
        for row in rows:
            if row["baseline"]:
                row["ratio"] = round(row["rps_median"] / medians[row["baseline"]], 3)
        return {
            "checks": self.checks(rows),
            "memory": self.memory,
            "benchmark": "GET and POST /api/v1/items",
            "started": self.started.isoformat(timespec="seconds"),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": "quick" if c.quick else "full",
            "settings": {
                "rounds": c.rounds, "duration_s": c.duration, "warmup_s": c.warmup,
                "wrk_threads": c.threads, "wrk_connections": c.connections, "items": c.items,
                "product_profile": "production (PostgreSQL, Redis cache, Redis broker, Redis rate limiter), "
                                   "1 uvicorn worker (2 for the 2-worker row)",
                "wrk_command": " ".join(wrk.argv(targets[1], c.duration)),
            },
            "cache_lookups_during_rounds": self.cache_checks,
            "machine": machine_facts(self.python),
            "rows": rows,
        }

    def checks(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The issue's targets, each PASS or FAIL with the figure it was judged on."""
        labels = {row["key"]: row["target"] for row in rows}
        checks: list[dict[str, Any]] = []
        for row in rows:
            goal = row["ratio_goal"]
            if goal is not None:
                checks.append({"check": f"{row['target']}: req/s vs {labels[row['baseline']]}",
                               "goal": f">= {goal:.2f}x", "value": f"{row['ratio']:.2f}x",
                               "pass": row["ratio"] >= goal and not row["errors"]})
        for row in rows:
            if row["product"]:
                checks.append({"check": f"{row['target']}: p99 / p50", "goal": f"<= {P99_OVER_P50_MAX:g}",
                               "value": f"{row['p99_over_p50']:.2f}",
                               "pass": row["p99_over_p50"] <= P99_OVER_P50_MAX})
        if self.memory:
            first, second = self.memory["milestones"]
            scaled = " (quick: scaled down)" if self.config.quick else ""
            peak = max(first["hwm_mb"], second["hwm_mb"])
            checks.append({"check": f"peak RSS of the API worker, {second['requests']:,} warm GETs{scaled}",
                           "goal": f"<= {PEAK_RSS_MAX_MB:g} MB", "value": f"{peak:.1f} MB",
                           "pass": peak <= PEAK_RSS_MAX_MB})
            growth = second["rss_mb"] - first["rss_mb"]
            checks.append({"check": f"RSS growth from {first['requests']:,} to {second['requests']:,} "
                                    f"warm GETs{scaled}",
                           "goal": f"<= {RSS_GROWTH_MAX_MB:g} MB", "value": f"{growth:+.1f} MB",
                           "pass": growth <= RSS_GROWTH_MAX_MB})
        return checks

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep cleaning up
                say(f"could not stop {proc.name}: {exc}")
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


def machine_facts(python: Path) -> dict[str, Any]:
    packages = _version([str(python), "-c", (
        "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
        "('fastapi', 'starlette', 'uvicorn', 'uvloop', 'httptools', 'pydantic', 'sqlalchemy', "
        "'asyncpg', 'redis')}))")])
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


def markdown(result: dict[str, Any]) -> str:
    s, m = result["settings"], result["machine"]
    labels = {row["key"]: row["target"] for row in result["rows"]}
    lines = [
        f"## {result['benchmark']}: product vs bare FastAPI ({result['mode']} run)",
        "",
        "Production profile, one uvicorn worker per server (two for the 2-worker row); "
        f"`wrk -t{s['wrk_threads']} "
        f"-c{s['wrk_connections']} -d{s['duration_s']:g}s --latency`, {s['rounds']} round(s) per target "
        f"in alternation after a {s['warmup_s']:g} s warm-up; medians over rounds.",
        "",
        "| target | req/s (median) | req/s min-max | p50 | p99 | p99/p50 | ratio vs baseline | goal |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in result["rows"]:
        ratio = "baseline" if row["ratio"] is None else f"{row['ratio']:.2f}x {labels[row['baseline']]}"
        errors = f" ⚠ {row['errors']} errors" if row["errors"] else ""
        goal = ""
        if row.get("ratio_goal") is not None:
            verdict = "PASS" if row["ratio"] >= row["ratio_goal"] else "FAIL"
            goal = f">= {row['ratio_goal']:.2f}x: {verdict}"
        lines.append(
            f"| {row['target']}{errors} | {row['rps_median']:,.0f} "
            f"| {row['rps_min']:,.0f}-{row['rps_max']:,.0f} "
            f"| {row['p50_ms_median']:.2f} ms | {row['p99_ms_median']:.2f} ms | {row['p99_over_p50']:.2f} "
            f"| {ratio} | {goal} |"
        )
    memory = result.get("memory") or {}
    if memory:
        lines += ["", f"Memory run (a fresh one-worker product, warm GETs; pid {memory['pid']}): at start "
                  f"VmRSS {memory['start']['rss_mb']:.1f} MB; " + "; ".join(
                      f"after {m['requests']:,} requests VmRSS {m['rss_mb']:.1f} MB, "
                      f"VmHWM {m['hwm_mb']:.1f} MB"
                      for m in memory["milestones"]) + "."]
    lines += ["", "| target (issue \"Performance\") | goal | measured | result |", "|---|---|---|---|"]
    for check in result.get("checks", []):
        lines.append(f"| {check['check']} | {check['goal']} | {check['value']} | "
                     f"{'PASS' if check['pass'] else 'FAIL'} |")
    checks = result.get("cache_lookups_during_rounds") or {}
    if checks:
        lines += ["", "Cache lookups during the measured rounds (product `/metrics`): " + "; ".join(
            f"{key}: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(vals.items()) if v) for key, vals in
            checks.items())]
    lines += [
        "",
        f"Machine: {m['nproc']} CPU(s), {m['cpu']}; {m['python']}; {m['os']}; load average at end "
        f"{', '.join(map(str, m['loadavg_at_end']))}; PostgreSQL {m['postgresql']}, Redis {m['redis']}; "
        f"{m['wrk']}.",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ".",
        f"Commit {m['git']}, {m['date']}. wrk, the servers, PostgreSQL and Redis share the machine.",
        "",
    ]
    return "\n".join(lines)


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
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            # A second Ctrl-C must not leave a database or servers behind; cleanup is bounded.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                bench.cleanup()
            finally:
                signal.signal(signal.SIGINT, previous)
    text = markdown(result)
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    config.output.with_suffix(".md").write_text(text)
    print()
    print(text)
    say(f"written {config.output.with_suffix('.md')} and {config.output.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
