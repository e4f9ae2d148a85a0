"""Atrium scaled out on one machine: nginx in front of two API processes, two workers.

Run it through ``deploy/scale-out`` (which picks the project's virtualenv):

    deploy/scale-out [start] [--run-dir DIR] [--port PORT] [--apis 2] [--workers 2] ...
    deploy/scale-out stop [--run-dir DIR]
    deploy/scale-out status [--run-dir DIR]

``start`` runs in the foreground: it creates (if missing) and migrates a private PostgreSQL
database, then starts, all on 127.0.0.1 with free ports unless told otherwise, a local SMTP sink
(``deploy/smtp_sink.py``, mail appended to ``mail.jsonl``), the local payment gateway
(``tests.support.gateway``, webhooks sent through nginx), the API processes (``atrium serve``,
production profile), the workers (``atrium worker``) and nginx (a non-daemon child with a private
prefix, config and temp dirs). Once ``/health/ready`` answers through nginx it creates an admin
and a few items, writes ``scale-out.json`` / ``scale-out.env`` into the run directory and prints
the URL. Ctrl-C or SIGTERM (what ``stop`` sends) stops everything in order -- nginx, APIs,
workers, gateway and SMTP -- each with its stop signal, a wait, then SIGKILL; drops the database
if this run created it and deletes the run's Redis keys.

The environment of every API and worker process is the run directory's ``atrium.env``.
nginx logs one JSON line per request to ``logs/nginx-access.log`` with ``upstream`` (the API
process that served it), so the share of each process can be counted without touching the app.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN_DIR = ROOT / "var" / "scale-out"
STATE_FILE = "scale-out.json"
LOCUST_ENV_FILE = "scale-out.env"
ENV_FILE = "atrium.env"
WEBHOOK_PATH = "/api/v1/webhooks/payment-gateway"

# The ATRIUM_ variables every API and worker process gets. deploy/docker-compose.yml and
# deploy/k8s/ set the same ones (tests/deploy checks it).
ATRIUM_VARIABLES = (
    "ATRIUM_ENV",
    "ATRIUM_MODULES",
    "ATRIUM_SECRET_KEY",
    "ATRIUM_DATABASE_URL",
    "ATRIUM_CACHE_BACKEND",
    "ATRIUM_REDIS_URL",
    "ATRIUM_CACHE_NAMESPACE",
    "ATRIUM_BROKER_BACKEND",
    "ATRIUM_BROKER_URL",
    "ATRIUM_BROKER_NAMESPACE",
    "ATRIUM_EMAIL_BACKEND",
    "ATRIUM_SMTP_HOST",
    "ATRIUM_SMTP_PORT",
    "ATRIUM_PAYMENTS_BACKEND",
    "ATRIUM_PAYMENTS_URL",
    "ATRIUM_PAYMENTS_API_KEY",
    "ATRIUM_PAYMENTS_WEBHOOK_SECRET",
    "ATRIUM_LOG_JSON",
    "ATRIUM_LOG_LEVEL",
    "ATRIUM_TRUSTED_PROXIES",
)


def say(message: str) -> None:
    print(f"scale-out: {message}", flush=True)


class StartupError(RuntimeError):
    """Something did not come up; the message says what and where its log is."""


# --- processes -----------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if the supervisor dies (even by SIGKILL), so nothing is orphaned."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 15.0
    port: int | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of the run's environment
    process: subprocess.Popen[bytes] | None = None
    reported: bool = False

    def start(self, env: dict[str, str], pid_dir: Path) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=ROOT, env={**env, **self.env}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )
        (pid_dir / f"{self.name}.pid").write_text(f"{self.process.pid}\n")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def stop_children(children: list[Child]) -> dict[str, int | None]:
    """Send each its stop signal, wait up to its timeout, then SIGKILL; returns the exit codes."""
    for child in children:
        if child.alive():
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(child.stop_signal)
    codes: dict[str, int | None] = {}
    for child in children:
        if child.process is None:
            continue
        try:
            codes[child.name] = child.process.wait(timeout=child.stop_timeout)
        except subprocess.TimeoutExpired:
            say(f"{child.name} did not stop within {child.stop_timeout:g}s; killing it")
            child.process.kill()
            codes[child.name] = child.process.wait()
    return codes


# --- small helpers -------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def write_private(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def render_env_file(values: dict[str, str]) -> str:
    lines = [
        "# Written by deploy/scale-out: the environment of every API and worker process of this run.",
        "# KEY=VALUE lines, no quoting (also usable as a docker compose env_file).",
    ]
    lines += [f"{key}={value}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def build_env(*, secret_key: str, database_url: str, redis_url: str, namespace: str, smtp_port: int,
              gateway_url: str, payments_api_key: str, payments_webhook_secret: str,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    """The API/worker environment, in the order it is written to ``atrium.env``."""
    values = {
        "ATRIUM_ENV": "production",
        "ATRIUM_MODULES": "users,items,billing",
        "ATRIUM_SECRET_KEY": secret_key,
        "ATRIUM_DATABASE_URL": database_url,
        "ATRIUM_CACHE_BACKEND": "redis",
        "ATRIUM_REDIS_URL": redis_url,
        "ATRIUM_CACHE_NAMESPACE": f"{namespace}-cache",
        "ATRIUM_BROKER_BACKEND": "redis",
        "ATRIUM_BROKER_URL": redis_url,
        "ATRIUM_BROKER_NAMESPACE": f"{namespace}-broker",
        "ATRIUM_EMAIL_BACKEND": "smtp",
        "ATRIUM_SMTP_HOST": "127.0.0.1",
        "ATRIUM_SMTP_PORT": str(smtp_port),
        "ATRIUM_PAYMENTS_BACKEND": "http",
        "ATRIUM_PAYMENTS_URL": gateway_url,
        "ATRIUM_PAYMENTS_API_KEY": payments_api_key,
        "ATRIUM_PAYMENTS_WEBHOOK_SECRET": payments_webhook_secret,
        "ATRIUM_LOG_JSON": "true",
        "ATRIUM_LOG_LEVEL": "INFO",
        # nginx is the only proxy: believe its X-Forwarded-For, so per-client rate limits and
        # logs see the real client, not nginx (ATRIUM_ for Atrium, the other for uvicorn).
        "ATRIUM_TRUSTED_PROXIES": "127.0.0.1",
        "FORWARDED_ALLOW_IPS": "127.0.0.1",
    }
    assert tuple(k for k in values if k.startswith("ATRIUM_")) == ATRIUM_VARIABLES
    values.update(extra or {})
    return values


def parse_postgres(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or 5432,
            "user": parts.username or "postgres", "password": parts.password}


def database_url(postgres: dict[str, Any], name: str) -> str:
    auth = postgres["user"] + (f":{postgres['password']}" if postgres["password"] else "")
    return f"postgresql+asyncpg://{auth}@{postgres['host']}:{postgres['port']}/{name}"


async def _admin_connection(postgres: dict[str, Any]) -> Any:
    import asyncpg

    return await asyncpg.connect(host=postgres["host"], port=postgres["port"], user=postgres["user"],
                                 password=postgres["password"], database="postgres", timeout=5)


async def _ensure_database(postgres: dict[str, Any], name: str) -> bool:
    conn = await _admin_connection(postgres)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        await conn.execute(f'CREATE DATABASE "{name}"')
        return True
    finally:
        await conn.close()


async def _drop_database(postgres: dict[str, Any], name: str) -> None:
    conn = await _admin_connection(postgres)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def flush_namespace(redis_url: str, namespace: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


# --- nginx ---------------------------------------------------------------------------------------

NGINX_LOG_FORMAT = (
    '{"time":"$time_iso8601","remote_addr":"$remote_addr","method":"$request_method",'
    '"uri":"$request_uri","status":$status,"upstream":"$upstream_addr",'
    '"upstream_status":"$upstream_status","request_time":$request_time,'
    '"upstream_time":"$upstream_response_time","request_id":"$atrium_request_id",'
    '"bytes_sent":$bytes_sent}'
)


def render_nginx_conf(run_dir: Path, port: int, api_ports: list[int]) -> str:
    temp = run_dir / "nginx" / "temp"
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in api_ports
    )
    # As root, nginx would switch its workers to "nobody", who cannot enter a private run dir.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""# Written by deploy/scale-out on every start; edits are lost.
daemon off;
{user}worker_processes 1;
pid {run_dir}/nginx/nginx.pid;
error_log {run_dir}/logs/nginx-error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {temp}/client_body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    default_type application/octet-stream;
    server_tokens off;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 65s;

    # X-Request-ID: the client's when it sent one, else nginx's own; the API accepts a
    # well-formed id and echoes it, so one id follows a request through nginx, API and jobs.
    map $http_x_request_id $atrium_request_id {{
        default $http_x_request_id;
        ""      $request_id;
    }}

    # One JSON line per request; "upstream" is the API process that served it.
    log_format atrium escape=json '{NGINX_LOG_FORMAT}';
    access_log {run_dir}/logs/nginx-access.log atrium;

    upstream atrium_api {{
        # Round robin (nginx's default) over the API processes, with idle keep-alive
        # connections kept open to them.
{servers}
        keepalive 32;
        keepalive_requests 10000;
        keepalive_timeout 60s;
    }}

    server {{
        listen 127.0.0.1:{port};
        server_name _;
        client_max_body_size 1m;

        location = /nginx-health {{
            access_log off;
            default_type text/plain;
            return 200 "ok\\n";
        }}

        location / {{
            proxy_pass http://atrium_api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-ID $atrium_request_id;
            proxy_connect_timeout 2s;
            proxy_send_timeout 60s;
            proxy_read_timeout 60s;
            # A refused connection or a connect timeout tries the other process; nginx never
            # retries a POST/PATCH that reached an upstream (non-idempotent), so no double charge.
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""


def find_nginx(explicit: str | None) -> str:
    candidate = explicit or shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(candidate).exists() and shutil.which(candidate) is None:
        raise StartupError(
            "nginx not found (install it: apt-get install -y nginx; scripts/services does it)"
        )
    return candidate


# --- the supervisor ------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    run_dir: Path
    children: list[Child] = field(default_factory=list)
    stop_requested: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    postgres: dict[str, Any] = field(default_factory=dict)
    owns_dir: bool = False  # False until this supervisor has claimed the run dir

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.run_dir / "pids"

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self.stop_requested is None:
            self.stop_requested = signum

    def check(self) -> None:
        if self.stop_requested is not None:
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check()
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def save_state(self) -> None:
        write_private(self.run_dir / STATE_FILE, json.dumps(self.state, indent=2) + "\n")

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    # -- start ------------------------------------------------------------------------------------

    def prepare_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        pid_file = self.run_dir / "supervisor.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip() or 0)
            if pid and pid != os.getpid() and pid_alive(pid) and "scale_out" in cmdline(pid):
                raise StartupError(f"already running in {self.run_dir} (pid {pid}); "
                                   f"stop it with: deploy/scale-out stop --run-dir {self.run_dir}")
        stop_leftovers(self.run_dir)  # a previous supervisor killed with SIGKILL leaves its database
        for sub in ("logs", "pids", "nginx"):
            shutil.rmtree(self.run_dir / sub, ignore_errors=True)
        for name in ("mail.jsonl", STATE_FILE, LOCUST_ENV_FILE, ENV_FILE):
            (self.run_dir / name).unlink(missing_ok=True)
        for sub in ("logs", "pids", "nginx/temp"):
            (self.run_dir / sub).mkdir(parents=True)
        pid_file.write_text(f"{os.getpid()}\n")
        self.owns_dir = True

    def run_command(self, name: str, argv: list[str], env: dict[str, str], timeout: float) -> str:
        """Run a one-shot command with its output in logs/<name>.log; raise if it fails."""
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    raise StartupError(f"{name} took longer than {timeout:g}s (log: {log})")
                self.sleep(0.05)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        output = log.read_text(errors="replace")
        if process.returncode != 0:
            raise StartupError(f"{name} failed with exit code {process.returncode}:\n{output[-2000:]}")
        return output

    def start(self) -> None:
        args = self.args
        self.prepare_dir()
        nginx = find_nginx(args.nginx)
        if args.api_ports:
            args.apis = len(args.api_ports)
        wanted = [args.port, *(args.api_ports or [0] * args.apis), args.smtp_port, args.gateway_port,
                  *[0] * args.workers]
        picked = iter(free_ports(sum(1 for p in wanted if not p)))
        port, *rest = [p or next(picked) for p in wanted]
        api_ports, rest = rest[: args.apis], rest[args.apis:]
        (smtp_port, gateway_port), metrics_ports = rest[:2], rest[2:]
        url = f"http://127.0.0.1:{port}"
        suffix = uuid.uuid4().hex[:8]
        namespace = args.namespace or f"atrium-scale-out-{suffix}"
        db_name = args.database or f"atrium_scale_out_{suffix}"
        self.postgres = parse_postgres(args.postgres)
        db_url = database_url(self.postgres, db_name)
        api_key, webhook_secret = "sk_scale_" + secrets.token_hex(16), "whsec_" + secrets.token_hex(16)
        admin_email = args.admin_email or f"admin-{suffix}@example.com"
        admin_password = args.admin_password or secrets.token_urlsafe(18)
        self.state = {
            "ready": False, "url": url, "run_dir": str(self.run_dir), "supervisor_pid": os.getpid(),
            "database": {"name": db_name, "created": False, "keep": args.keep_database,
                         "postgres": args.postgres},
            "redis_url": args.redis_url, "namespace": namespace,
            "ports": {"nginx": port, "apis": api_ports, "smtp": smtp_port, "gateway": gateway_port,
                      "worker_metrics": metrics_ports},
            "env_file": str(self.run_dir / ENV_FILE),
            "logs": {"nginx_access": str(self.logs / "nginx-access.log"),
                     "mail": str(self.run_dir / "mail.jsonl")},
            "admin": {"email": admin_email, "password": admin_password},
            "processes": [], "items": [],
        }
        self.save_state()

        say(f"run dir {self.run_dir}")
        created = asyncio.run(_ensure_database(self.postgres, db_name))
        self.state["database"]["created"] = created
        self.save_state()
        say(f"database {db_name} ({'created' if created else 'exists, reused'})")

        extra = dict(item.split("=", 1) for item in args.set)
        extra = {(k if k.startswith(("ATRIUM_", "FORWARDED_")) else f"ATRIUM_{k.upper()}"): v
                 for k, v in extra.items()}
        values = build_env(
            secret_key=args.secret_key or secrets.token_urlsafe(48), database_url=db_url,
            redis_url=args.redis_url, namespace=namespace, smtp_port=smtp_port,
            gateway_url=f"http://127.0.0.1:{gateway_port}", payments_api_key=api_key,
            payments_webhook_secret=webhook_secret, extra=extra,
        )
        write_private(self.run_dir / ENV_FILE, render_env_file(values))
        base = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
        env = {**base, **values, "PYTHONUNBUFFERED": "1"}
        py = sys.executable

        self.run_command("migrate", [py, "-m", "main", "migrate"], env, timeout=120)
        say("database migrated")

        self.children = [
            Child("smtp", [py, "deploy/smtp_sink.py", "--port", str(smtp_port),
                           "--out", str(self.run_dir / "mail.jsonl")],
                  self.logs / "smtp.log", port=smtp_port, stop_timeout=10),
            Child("gateway", [py, "-m", "tests.support.gateway", "--port", str(gateway_port),
                              "--api-key", api_key, "--webhook-secret", webhook_secret,
                              "--webhook-url", url + WEBHOOK_PATH, "--auto-settle-after",
                              str(args.auto_settle_after)],
                  self.logs / "gateway.log", port=gateway_port, stop_timeout=10),
        ]
        for i, api_port in enumerate(api_ports, 1):
            self.children.append(Child(
                f"api-{i}", [py, "-m", "main", "serve", "--host", "127.0.0.1", "--port", str(api_port)],
                self.logs / f"api-{i}.log", port=api_port, stop_timeout=20))
        for i, metrics_port in enumerate(metrics_ports, 1):
            # Each worker serves its own /metrics (one port per process on one machine).
            self.children.append(Child(
                f"worker-{i}", [py, "-m", "main", "worker", "--threads", str(args.worker_threads)],
                self.logs / f"worker-{i}.log", stop_timeout=40,
                env={"ATRIUM_WORKER_METRICS_PORT": str(metrics_port)}))
        conf = self.run_dir / "nginx" / "nginx.conf"
        conf.write_text(render_nginx_conf(self.run_dir, port, api_ports))
        nginx_argv = [nginx, "-p", str(self.run_dir / "nginx"), "-c", str(conf),
                      "-e", str(self.logs / "nginx-error.log")]
        self.run_command("nginx-test", [*nginx_argv, "-t"], base, timeout=30)
        self.children.append(Child("nginx", nginx_argv, self.logs / "nginx.log", port=port,
                                   stop_signal=signal.SIGQUIT, stop_timeout=10))

        for child in self.children:
            child.start(env if child.name != "nginx" else base, self.pids)
            self.state["processes"].append({"name": child.name, "pid": child.pid, "port": child.port,
                                            "log": str(child.log), "cmdline": " ".join(child.argv)})
        self.save_state()
        say("started " + ", ".join(f"{c.name} (pid {c.pid})" for c in self.children))

        self.wait_until_up(url, args.ready_timeout)
        self.seed(url, env, admin_email, admin_password, args.items)
        self.state["ready"] = True
        self.save_state()
        write_private(self.run_dir / LOCUST_ENV_FILE, render_env_file({
            "ATRIUM_SCALE_OUT_URL": url,
            "ATRIUM_SCALE_OUT_ADMIN_EMAIL": admin_email,
            "ATRIUM_SCALE_OUT_ADMIN_PASSWORD": admin_password,
        }))
        say(f"ready at {url}  (APIs on {', '.join(map(str, api_ports))}; "
            f"{args.workers} workers; admin {admin_email} / {admin_password})")
        say(f"logs in {self.logs}; stop with Ctrl-C or: deploy/scale-out stop --run-dir {self.run_dir}")

    def wait_until_up(self, url: str, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        pending = {c.name for c in self.children}
        ready_through_nginx = 0
        with httpx.Client(timeout=2.0) as client:
            while pending or ready_through_nginx < 2:
                self.check()
                for child in self.children:
                    if not child.alive():
                        raise StartupError(f"{child.name} exited with code {child.process.returncode} "
                                           f"while starting; log {child.log}:\n{child.tail()}")
                for name in sorted(pending):
                    if self._is_up(client, self.child(name)):
                        pending.discard(name)
                        say(f"{name} is up")
                if not pending:
                    with contextlib.suppress(httpx.HTTPError):
                        # Twice: round robin sends the two probes to two different API processes.
                        if client.get(url + "/health/ready").status_code == 200:
                            ready_through_nginx += 1
                if time.monotonic() > deadline:
                    waiting = ", ".join(sorted(pending)) or "/health/ready through nginx"
                    raise StartupError(f"not up after {timeout:g}s: {waiting}")
                if pending or ready_through_nginx < 2:
                    self.sleep(0.2)
        say(f"{url}/health/ready answers 200 through nginx")

    @staticmethod
    def _is_up(client: Any, child: Child) -> bool:
        import httpx

        if child.name.startswith("worker-"):
            return "worker started" in child.tail(1_000_000)
        if child.name.startswith("api-"):
            with contextlib.suppress(httpx.HTTPError):
                return bool(client.get(f"http://127.0.0.1:{child.port}/health/ready").status_code == 200)
            return False
        if child.name == "nginx":
            with contextlib.suppress(httpx.HTTPError):
                return bool(client.get(f"http://127.0.0.1:{child.port}/nginx-health").status_code == 200)
            return False
        return child.port is not None and port_open(child.port)

    def seed(self, url: str, env: dict[str, str], email: str, password: str, items: int) -> None:
        """An admin (made with the CLI, the only way to make one) and ``items`` catalog items."""
        import httpx

        try:
            self.run_command("create-admin", [sys.executable, "-m", "main", "create-admin", "--email", email,
                                              "--password", password, "--full-name", "Scale-out Admin"],
                             env, timeout=60)
        except StartupError as exc:
            say(f"create-admin failed (an existing admin in a reused database?): {exc}".splitlines()[0])
        with httpx.Client(base_url=url, timeout=10.0) as client:
            token = client.post("/api/v1/auth/token", data={"username": email, "password": password})
            if token.status_code != 200:
                say(f"cannot log in as {email} ({token.status_code}); no items created")
                return
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            for i in range(1, items + 1):
                body = {"name": f"Scale-out item {i}", "price": 500 + 250 * i, "currency": "EUR"}
                created = client.post("/api/v1/items", json=body, headers=headers)
                if created.status_code != 201:
                    raise StartupError(f"creating an item failed: {created.status_code} {created.text}")
                self.state["items"].append(created.json()["id"])
        say(f"admin {email} and {items} item(s) created")

    # -- supervise and stop -----------------------------------------------------------------------

    def supervise(self) -> None:
        while self.stop_requested is None:
            for child in self.children:
                if not child.alive() and not child.reported:
                    child.reported = True
                    assert child.process is not None
                    say(f"WARNING: {child.name} exited unexpectedly with code {child.process.returncode} "
                        f"(log {child.log}); the others keep running")
            time.sleep(0.2)
        say(f"got {signal.Signals(self.stop_requested).name}; stopping")

    def shutdown(self) -> int:
        """Stop in order (nginx, APIs, workers, gateway + SMTP), then drop what this run created."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        tiers = [
            [c for c in self.children if c.name == "nginx"],
            [c for c in self.children if c.name.startswith("api-")],
            [c for c in self.children if c.name.startswith("worker-")],
            [c for c in self.children if c.name in ("gateway", "smtp")],
        ]
        codes: dict[str, int | None] = {}
        for tier in tiers:
            codes.update(stop_children(tier))
        if codes:
            say("stopped: " + ", ".join(f"{name}={code}" for name, code in codes.items()))
        if not self.owns_dir:  # e.g. "already running": the run dir belongs to another supervisor
            return 1
        cleanup(self.state)
        for pid_file in self.pids.glob("*.pid"):
            pid_file.unlink(missing_ok=True)
        (self.run_dir / "supervisor.pid").unlink(missing_ok=True)
        if self.state:
            self.state.update(ready=False, stopped=True, exit_codes=codes)
            self.save_state()
        # The worker, the gateway and the sink exit 0 on SIGTERM, nginx 0 on SIGQUIT; uvicorn shuts
        # down gracefully and then re-raises the signal, so -SIGTERM is its clean exit.
        clean = {c.name: (0, -c.stop_signal) for c in self.children}
        return 0 if all(code in clean[name] for name, code in codes.items()) else 1


def cleanup(state: dict[str, Any]) -> None:
    """Drop the database if this run created it (and was not told to keep it); delete Redis keys."""
    database = state.get("database") or {}
    if database.get("created") and not database.get("keep"):
        try:
            asyncio.run(_drop_database(parse_postgres(database["postgres"]), database["name"]))
            database["created"] = False
            say(f"database {database['name']} dropped")
        except Exception as exc:
            say(f"WARNING: could not drop database {database['name']}: {exc}")
    if database.get("keep"):  # resuming later needs the queued jobs too (same --database and --namespace)
        say(f"kept database {database.get('name')} and the Redis keys under {state.get('namespace')}")
        return
    if state.get("namespace") and state.get("redis_url"):
        try:
            deleted = flush_namespace(state["redis_url"], state["namespace"])
            say(f"deleted {deleted} Redis key(s) under {state['namespace']}")
        except Exception as exc:
            say(f"WARNING: could not delete the Redis keys under {state['namespace']}: {exc}")


def command_start(args: argparse.Namespace) -> int:
    run = Run(args, Path(args.run_dir).resolve())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, run.on_signal)
    try:
        run.start()
        run.supervise()
    except KeyboardInterrupt:
        say("interrupted; stopping")
    except Exception as exc:  # StartupError, or a server (PostgreSQL, Redis) that is not there
        say(f"ERROR: {exc}" if isinstance(exc, StartupError) else f"ERROR: {type(exc).__name__}: {exc}")
        run.shutdown()
        return 1
    return run.shutdown()


def _same_process(entry: dict[str, Any]) -> bool:
    """The pid still runs what we started (nginx retitles itself "nginx: master process <argv>")."""
    return pid_alive(entry["pid"]) and entry["cmdline"].strip() in cmdline(entry["pid"])


def command_stop(args: argparse.Namespace) -> int:
    """SIGTERM the supervisor and wait; if it is gone, stop its leftovers and clean up ourselves."""
    run_dir = Path(args.run_dir).resolve()
    pid_file = run_dir / "supervisor.pid"
    pid = int(pid_file.read_text().strip() or 0) if pid_file.exists() else 0
    if pid and pid_alive(pid) and "scale_out" in cmdline(pid):
        say(f"stopping the supervisor (pid {pid})")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while pid_alive(pid) and "scale_out" in cmdline(pid):
            if time.monotonic() > deadline:
                say(f"the supervisor did not stop within {args.timeout:g}s; killing it and its children")
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        else:
            say("stopped")
            return 0
    if not stop_leftovers(run_dir):
        say(f"nothing running in {run_dir}")
    return 0


def stop_leftovers(run_dir: Path) -> bool:
    """Clean up after a supervisor that died without stopping: its processes, database, Redis keys.

    Returns False when the run dir holds no unfinished run.
    """
    state_file = run_dir / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return False
    if state.get("stopped"):
        return False
    leftovers = [p for p in state.get("processes", []) if _same_process(p)]
    for entry in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(entry["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 45
    while any(pid_alive(p["pid"]) for p in leftovers) and time.monotonic() < deadline:
        time.sleep(0.2)
    for entry in leftovers:
        if pid_alive(entry["pid"]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry["pid"], signal.SIGKILL)
    cleanup(state)
    state.update(ready=False, stopped=True)
    write_private(state_file, json.dumps(state, indent=2) + "\n")
    (run_dir / "supervisor.pid").unlink(missing_ok=True)
    say(f"cleaned up a run that had not stopped ({len(leftovers)} leftover process(es))")
    return True


def command_status(args: argparse.Namespace) -> int:
    state_file = Path(args.run_dir).resolve() / STATE_FILE
    if not state_file.exists():
        say("not started")
        return 1
    state = json.loads(state_file.read_text())
    print(f"url {state['url']}  ready={state.get('ready')}  database={state['database']['name']}")
    up = 0
    for entry in state.get("processes", []):
        alive = _same_process(entry)
        up += alive
        port = f":{entry['port']}" if entry.get("port") else ""
        print(f"  {entry['name']:<10} pid {entry['pid']:<8} {'up' if alive else 'DOWN':<5} {port}")
    return 0 if state.get("ready") and up == len(state.get("processes", [])) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deploy/scale-out", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    start = sub.add_parser("start", help="start everything in the foreground (the default)")
    start.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="logs, pids, nginx conf, state")
    start.add_argument("--port", type=int, default=0, help="nginx port (default: a free one)")
    start.add_argument("--apis", type=int, default=2, help="API processes (default 2)")
    start.add_argument("--api-ports", type=lambda s: [int(p) for p in s.split(",")],
                       help="comma-separated API ports (default: free ones)")
    start.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    start.add_argument("--worker-threads", type=int, default=2)
    start.add_argument("--smtp-port", type=int, default=0)
    start.add_argument("--gateway-port", type=int, default=0)
    start.add_argument("--auto-settle-after", type=float, default=2.0,
                       help="seconds before the gateway settles pending (tok_async) charges by webhook")
    start.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432",
                       help="the PostgreSQL server (its 'postgres' database is used to create ours)")
    start.add_argument("--database", help="database name (default: a new atrium_scale_out_<random>)")
    start.add_argument("--keep-database", action="store_true",
                       help="keep the database and Redis keys (resume: same --database and --namespace)")
    start.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    start.add_argument("--namespace", help="Redis key prefix for cache and broker (default: random)")
    start.add_argument("--secret-key", help="ATRIUM_SECRET_KEY (default: random)")
    start.add_argument("--admin-email")
    start.add_argument("--admin-password")
    start.add_argument("--items", type=int, default=5, help="catalog items to create (default 5)")
    start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="extra environment for APIs and workers (ATRIUM_ is added when missing)")
    start.add_argument("--nginx", help="the nginx binary (default: nginx on PATH, or /usr/sbin/nginx)")
    start.add_argument("--ready-timeout", type=float, default=60.0)
    for name, help_text in (("stop", "stop a running scale-out and clean up"),
                            ("status", "show the processes of a run dir")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
        cmd.add_argument("--timeout", type=float, default=120.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in {"start", "stop", "status", "-h", "--help"}:
        argv.insert(0, "start")
    args = _parser().parse_args(argv)
    handlers = {"start": command_start, "stop": command_stop, "status": command_status}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())

