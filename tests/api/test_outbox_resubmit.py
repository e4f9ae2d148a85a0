"""Nothing stays pending: a message lost from the broker shows in ``atrium outbox status`` and
``atrium outbox resubmit`` gets its job done, once.

A private production-like environment (its own PostgreSQL database, SMTP server and Redis broker
namespace). A user signs up while no worker runs; the API's relay sends the welcome email's message
to Redis and records its publication; the namespace is then wiped, so the message is gone for good.
A real ``atrium worker`` starts and has nothing to do. The registry says the message is incomplete;
``resubmit --older-than 0`` sends it again, the worker mails the user once, and the publication ends
``completed``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from core.messaging.publications import COMPLETED, PUBLISHED, RESUBMITTED, EventPublication
from tests.support.api import sign_up
from tests.support.production import private_production
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.stack import Stack
from tests.support.waiting import eventually, holds_for
from tests.support.worker import ROOT, as_environment

WELCOME = "users.send_welcome_email"


def atrium(values: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    """``atrium <args>`` in a process of its own, on the environment's settings."""
    return subprocess.run([sys.executable, "-m", "main", *args], cwd=ROOT, env=as_environment(values),
                          capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


async def _welcome(stack: Stack) -> list[EventPublication]:
    async with stack.container.sessions()() as session:
        statement = select(EventPublication).where(EventPublication.task == WELCOME)
        return list((await session.scalars(statement)).all())


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_a_message_lost_from_the_broker_is_resubmitted_and_takes_effect_once(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    async with private_production(tmp_path, pg_database_factory) as env, env.api() as stack:
        user, _ = await sign_up(stack.client, full_name="Lost Message")
        email = user["email"]

        async def published() -> bool:
            return [p.status for p in await _welcome(stack)] == [PUBLISHED]

        await eventually(published, within=10)
        (publication,) = await _welcome(stack)
        message_id = str(publication.message_id)
        await flush_redis_namespace(env.namespace)  # the message is lost
        worker = await env.start_worker()
        await asyncio.sleep(1.0)  # the worker fetches: nothing there
        assert stack.mail_count(email) == 0

        listed = await asyncio.to_thread(atrium, env.values, "outbox", "status")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if message_id in line)
        assert row.split()[1:3] == [WELCOME, PUBLISHED], listed.stdout
        as_json = await asyncio.to_thread(atrium, env.values, "outbox", "status", "--json")
        report = json.loads(as_json.stdout)
        assert {(i["message_id"], i["task"], i["status"]) for i in report["incomplete"]} >= {
            (message_id, WELCOME, PUBLISHED)}

        resubmitted = await asyncio.to_thread(atrium, env.values, "outbox", "resubmit", "--older-than", "0")
        assert resubmitted.returncode == 0, resubmitted.stderr
        assert any(line.startswith(f"resubmitted {message_id} {WELCOME} (was published")
                   for line in resubmitted.stdout.splitlines()), resubmitted.stdout

        await eventually(lambda: stack.mail_count(email) == 1, within=15)

        async def completed() -> bool:
            return [(p.status, p.resubmissions) for p in await _welcome(stack)] == [(COMPLETED, 1)]

        await eventually(completed, within=10)
        await holds_for(lambda: stack.mail_count(email) == 1, 1.0)
        after = json.loads((await asyncio.to_thread(atrium, env.values, "outbox", "status", "--json")).stdout)
        assert message_id not in {i["message_id"] for i in after["incomplete"]}
        assert after["by_status"][RESUBMITTED] == 0
        assert f"job {WELCOME} done (message {message_id})" in env.log_of(worker)
        await env.stop_worker(worker)
