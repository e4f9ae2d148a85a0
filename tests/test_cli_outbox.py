"""``atrium outbox status`` and ``atrium outbox resubmit`` as real subprocesses, on a SQLite file of the
test's own with publications the relay wrote: their output, what they change, and their exit codes."""

from __future__ import annotations

import json
import subprocess
import uuid
from datetime import timedelta
from typing import Any

import pytest
from dramatiq import Message
from sqlalchemy import select, update

from core.db.base import utcnow
from core.db.engine import create_engine
from core.db.session import UnitOfWork, session_factory
from core.messaging.outbox import Outbox, OutboxRelay
from core.messaging.publications import COMPLETED, FAILED, PUBLISHED, RESUBMITTED, EventPublication
from tests.support.cli import ok, run_cli
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.services import REDIS_URL, require
from tests.support.smtp import free_port

pytestmark = pytest.mark.slow

WELCOME, RECEIPT = "users.send_welcome_email", "billing.send_receipt"


async def _publications(url: str) -> dict[str, dict[str, Any]]:
    """Five jobs relayed (to nowhere): two stale, one recent, one completed, one failed; by role."""
    engine = create_engine(url)
    sessions = session_factory(engine)
    try:
        for n, name in enumerate((WELCOME, WELCOME, RECEIPT, WELCOME, RECEIPT)):
            async with UnitOfWork(sessions) as session:
                Outbox().enqueue(session, name, {"n": n})
        sent: list[Message[Any]] = []
        await OutboxRelay(sessions, sent.append, {}, lambda task: f"q.{task.split('.')[0]}").relay_once()
        ids = [m.kwargs["message_id"] for m in sorted(sent, key=lambda m: m.kwargs["payload"]["n"])]
        roles = dict(zip(("stale", "stale2", "recent", "completed", "failed"), ids, strict=True))
        changes: dict[str, dict[str, Any]] = {
            "stale": {"published_at": utcnow() - timedelta(seconds=900)},
            "stale2": {"published_at": utcnow() - timedelta(seconds=700)},
            "completed": {"status": COMPLETED, "completed_at": utcnow()},
            "failed": {"status": FAILED, "failed_at": utcnow(), "last_error": "GatewayError: declined",
                       "published_at": utcnow() - timedelta(seconds=800)},
        }
        async with UnitOfWork(sessions) as session:
            for role, values in changes.items():
                await session.execute(update(EventPublication)
                                      .where(EventPublication.message_id == uuid.UUID(roles[role]))
                                      .values(**values))
        welcome = ("stale", "stale2", "completed")
        return {role: {"id": message_id, "task": WELCOME if role in welcome else RECEIPT}
                for role, message_id in roles.items()}
    finally:
        await engine.dispose()


async def _statuses(url: str) -> dict[str, tuple[str, int]]:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as session:
            rows = (await session.scalars(select(EventPublication))).all()
        return {str(r.message_id): (r.status, r.resubmissions) for r in rows}
    finally:
        await engine.dispose()


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed: exit 2, nothing on stdout, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.strip().splitlines() if "fast path off:" not in line]
    assert len(lines) == 1, result.stderr
    return lines[0]


async def test_status_counts_and_lists_the_incomplete_ones(private_sqlite_url: str) -> None:
    roles = await _publications(private_sqlite_url)

    text = ok(run_cli("outbox", "status", "--older-than", "600", database_url=private_sqlite_url)).stdout

    lines = text.splitlines()
    assert lines[0] == "publications: published=3 resubmitted=0 failed=1 completed=1"
    assert lines[1].startswith("oldest incomplete: 9")  # ~900 s
    assert lines[1].endswith(" s")
    assert any(line.split() == [RECEIPT, "failed=1", "published=1"] for line in lines)
    assert any(line.split() == [WELCOME, "completed=1", "published=2"] for line in lines)
    assert "incomplete, first sent more than 600 s ago: 3" in lines
    listed = [line.split() for line in lines if line.startswith("  ") and len(line.split()) >= 5]
    assert [row[0] for row in listed] == [roles["stale"]["id"], roles["failed"]["id"], roles["stale2"]["id"]]
    failed = next(line for line in lines if roles["failed"]["id"] in line)
    assert "failed" in failed
    assert "resubmissions=0" in failed
    assert "GatewayError: declined" in failed
    assert roles["recent"]["id"] not in text  # younger than --older-than


async def test_status_as_json(private_sqlite_url: str) -> None:
    roles = await _publications(private_sqlite_url)

    report = json.loads(ok(run_cli("outbox", "status", "--json", database_url=private_sqlite_url)).stdout)

    assert report["by_status"] == {"published": 3, "resubmitted": 0, "failed": 1, "completed": 1}
    assert report["by_task"][WELCOME] == {"published": 2, "completed": 1}
    assert report["oldest_incomplete_seconds"] >= 899
    assert report["incomplete_total"] == 4  # --older-than 0: every incomplete one
    assert [row["message_id"] for row in report["incomplete"]] == [
        roles[r]["id"] for r in ("stale", "failed", "stale2", "recent")]
    assert report["incomplete"][1] == {
        "message_id": roles["failed"]["id"], "task": RECEIPT, "status": FAILED,
        "age_seconds": report["incomplete"][1]["age_seconds"], "resubmissions": 0,
        "last_error": "GatewayError: declined"}


async def test_resubmit_dry_run_prints_and_changes_nothing(private_sqlite_url: str) -> None:
    roles = await _publications(private_sqlite_url)
    before = await _statuses(private_sqlite_url)

    text = ok(run_cli("outbox", "resubmit", "--dry-run", database_url=private_sqlite_url)).stdout

    lines = text.splitlines()  # --older-than defaults to ATRIUM_OUTBOX_RESUBMIT_AFTER_SECONDS (600)
    assert [line.split()[2] for line in lines[:-1]] == [roles["stale"]["id"], roles["stale2"]["id"]]
    assert all(line.startswith("would resubmit ") for line in lines)
    assert lines[-1] == "would resubmit 2 publication(s)"
    assert await _statuses(private_sqlite_url) == before

    with_failed = ok(run_cli("outbox", "resubmit", "--dry-run", "--failed", "--older-than", "0",
                             database_url=private_sqlite_url)).stdout
    assert with_failed.splitlines()[-1] == "would resubmit 4 publication(s)"
    one = ok(run_cli("outbox", "resubmit", "--dry-run", "--id", roles["recent"]["id"],
                     database_url=private_sqlite_url)).stdout
    assert one.splitlines()[-1] == "would resubmit 1 publication(s)"
    assert roles["recent"]["id"] in one


@pytest.mark.redis
async def test_resubmit_sends_them_to_the_broker_and_marks_them(private_sqlite_url: str) -> None:
    require("redis")
    roles = await _publications(private_sqlite_url)
    namespace = f"atrium-test-{uuid.uuid4().hex[:10]}"
    broker = {"ATRIUM_BROKER_BACKEND": "redis", "ATRIUM_BROKER_URL": REDIS_URL,
              "ATRIUM_BROKER_NAMESPACE": namespace}
    try:
        result = ok(run_cli("outbox", "resubmit", "--failed", database_url=private_sqlite_url, **broker))
        queued = await _queued(namespace)
    finally:
        await flush_redis_namespace(namespace)

    lines = result.stdout.splitlines()
    assert lines[-1] == "resubmitted 3 publication(s)"
    assert [line.split()[1] for line in lines[:-1]] == [roles[r]["id"] for r in ("stale", "failed", "stale2")]
    assert "(was failed, last sent 8" in lines[1]
    assert sorted(queued) == sorted((roles[r]["id"], roles[r]["task"]) for r in ("stale", "failed", "stale2"))
    statuses = await _statuses(private_sqlite_url)
    assert {r: statuses[roles[r]["id"]] for r in roles} == {
        "stale": (RESUBMITTED, 1), "stale2": (RESUBMITTED, 1), "failed": (RESUBMITTED, 1),
        "recent": (PUBLISHED, 0), "completed": (COMPLETED, 0)}

    again = ok(run_cli("outbox", "resubmit", database_url=private_sqlite_url, **broker))
    assert again.stdout.strip() == "nothing to resubmit"  # just sent: not stale yet
    await flush_redis_namespace(namespace)


async def _queued(namespace: str) -> list[tuple[str, str]]:
    """(message id, actor) of every message waiting in the namespace's Redis queues."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        found = []
        async for key in client.scan_iter(match=f"{namespace}:*.msgs"):
            for raw in (await client.hgetall(key)).values():
                message = json.loads(raw)
                found.append((message["kwargs"]["message_id"], message["actor_name"]))
        return found
    finally:
        await client.aclose()


async def test_resubmit_with_the_broker_down_is_one_line_and_exit_2(private_sqlite_url: str) -> None:
    await _publications(private_sqlite_url)
    before = await _statuses(private_sqlite_url)

    line = one_line(run_cli("outbox", "resubmit", database_url=private_sqlite_url,
                            ATRIUM_BROKER_BACKEND="redis", ATRIUM_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0"))

    assert line.startswith("atrium: ATRIUM_BROKER_URL"), line
    assert await _statuses(private_sqlite_url) == before


async def test_resubmit_with_the_in_process_broker_is_refused(private_sqlite_url: str) -> None:
    line = one_line(run_cli("outbox", "resubmit", database_url=private_sqlite_url))

    assert "ATRIUM_BROKER_BACKEND=stub" in line


def test_status_with_the_database_down_is_one_line_and_exit_2() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/atrium"

    line = one_line(run_cli("outbox", "status", database_url=url))

    assert line.startswith("atrium: ATRIUM_DATABASE_URL"), line


def test_a_bad_id_or_age_is_a_usage_error(private_sqlite_url: str) -> None:
    bad_id = run_cli("outbox", "resubmit", "--id", "nope", database_url=private_sqlite_url)
    bad_age = run_cli("outbox", "status", "--older-than", "-1", database_url=private_sqlite_url)

    assert bad_id.returncode == 2
    assert "is not an outbox message id" in bad_id.stderr
    assert bad_age.returncode == 2
    assert "is not a number of seconds" in bad_age.stderr
