"""Real ``atrium serve`` processes on the production profile (PostgreSQL + Redis), for tests of what
one API process must see of another's writes (tests/api/test_sessions.py), and the CLI beside them."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.support.db import migrated
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.services import REDIS_URL, require
from tests.support.settings import CHEAP_HASHING, GENEROUS_RATE_LIMITS, TEST_SECRET
from tests.support.worker import ROOT, as_environment

Cli = Callable[..., Awaitable[str]]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def production_values(database_url: str, namespace: str) -> dict[str, Any]:
    """Settings of a production-profile API process without a worker: users and items only (no
    payment gateway to configure); jobs and events wait in the Redis broker's namespace."""
    return {
        "env": "production",
        "modules": ("users", "items"),
        "secret_key": TEST_SECRET,
        "database_url": database_url,
        "cache_backend": "redis",
        "redis_url": REDIS_URL,
        "cache_namespace": namespace,
        "broker_backend": "redis",
        "broker_url": REDIS_URL,
        "broker_namespace": namespace,
        "email_backend": "console",
        "database_pool_size": 5,
        "log_level": "WARNING",
        **CHEAP_HASHING,
        **GENEROUS_RATE_LIMITS,
    }


@asynccontextmanager
async def serve_process(values: dict[str, Any], log_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """``atrium serve`` on a free port with ``values`` as its environment; a client for it."""
    port = free_port()
    process = _start(values, log_path, port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
            await _wait_live(client, process, log_path)
            yield client
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_live(client: httpx.AsyncClient, process: subprocess.Popen[bytes], log_path: Path) -> None:
    for _ in range(600):
        if process.poll() is not None:
            break
        try:
            if (await client.get("/health/live")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"atrium serve did not start:\n{_tail(log_path)}")


def _start(values: dict[str, Any], log_path: Path, port: int) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "main", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=as_environment(values), stdout=log, stderr=subprocess.STDOUT,
        )


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def cli_runner(values: dict[str, Any]) -> Cli:
    """``atrium <args>`` with the processes' settings; returns stdout, fails on a non-zero exit.
    Runs without blocking the event loop, so a test can poll an API meanwhile."""

    async def run(*args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "main", *args, cwd=ROOT, env=as_environment(values),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
        command = " ".join(args)
        assert process.returncode == 0, f"atrium {command}: exit {process.returncode}\n{out!r}\n{err!r}"
        return out.decode()

    return run


@asynccontextmanager
async def production_pair(
    pg_database_factory: Callable[[], Awaitable[str]], tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient, Cli]]:
    """Two API processes on one fresh PostgreSQL database and one Redis namespace, and the CLI."""
    require("postgres")
    require("redis")
    namespace = f"atrium-test-{uuid.uuid4().hex[:10]}"
    values = production_values(await migrated(await pg_database_factory()), namespace)
    try:
        async with AsyncExitStack() as stack:
            a = await stack.enter_async_context(serve_process(values, tmp_path / "api-a.log"))
            b = await stack.enter_async_context(serve_process(values, tmp_path / "api-b.log"))
            yield a, b, cli_runner(values)
    finally:
        await flush_redis_namespace(namespace)
