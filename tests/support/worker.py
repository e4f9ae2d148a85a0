"""A real ``atrium worker`` process: started with settings as ``ATRIUM_*`` variables, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def as_environment(values: dict[str, Any]) -> dict[str, str]:
    """This process's environment without its ``ATRIUM_*`` variables, plus ``values`` as those."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATRIUM_")}
    for key, value in values.items():
        env[f"ATRIUM_{key.upper()}"] = ",".join(value) if isinstance(value, tuple) else str(value)
    return env


def start_worker(values: dict[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "main", "worker", "--threads", "2"],
        cwd=ROOT,
        env=as_environment(values),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def _has_started(log_path: Path) -> bool:
    return "worker started" in log_path.read_text(errors="replace")


async def wait_until_started(process: subprocess.Popen[bytes], log_path: Path) -> None:
    for _ in range(600):
        if _has_started(log_path):
            return
        if process.poll() is not None:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"atrium worker did not start:\n{_log_tail(log_path)}")


def stop_worker(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then the exit code (after a SIGKILL if it has not exited within 40 s)."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
