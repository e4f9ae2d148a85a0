"""A worker SIGKILLed with charges in flight and more prefetched: redelivery alone finishes them.

A real ``atrium worker`` (2 job threads, so dramatiq prefetches 4 messages of the billing queue)
takes 8 charge jobs: 2 are held at the gateway after charging (in flight), 2 wait in its work
queue (prefetched), 4 are still on the broker. It is killed, a new one starts, and every payment
must end ``succeeded`` within the bound of docs/redelivery.md, with one gateway charge per payment
and one receipt per paid invoice. Once on the Redis broker, once on RabbitMQ.

Nothing else finishes a pending payment here (no reconciler, no webhook): only redelivery.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from config import Settings
from tests.support.api import bearer, make_admin, sign_up
from tests.support.billing import invoice_status, new_invoice, new_item, pay, payment_of, receipts
from tests.support.crash import delete_rabbitmq_queues, redelivered
from tests.support.production import Private, private_production
from tests.support.services import RABBITMQ_URL, REDIS_URL, require
from tests.support.smtp import free_port
from tests.support.stack import Stack
from tests.support.waiting import eventually, holds_for

PAYMENTS = 8
IN_FLIGHT = 2  # the worker's job threads (tests.support.worker starts it with --threads 2)
TAKEN = 2 * IN_FLIGHT  # dramatiq's queue prefetch: 2 per job thread (running + waiting)
CHARGE_TASK = "billing.charge_payment"


def bound(settings: Settings) -> float:
    """Seconds after a new worker has started within which every message must be back and done:
    the heartbeat timeout, one idle fetch interval (dramatiq's 1 s worker timeout), and 4 s for
    the 8 charges, their receipts and the test's polling (docs/redelivery.md)."""
    return settings.broker_heartbeat_timeout_ms / 1000 + 1 + 4


async def _ready_messages(env: Private, queue: str) -> int:
    """Messages of ``queue`` waiting on the broker, not yet taken by any worker."""
    if env.values["broker_backend"] == "redis":
        import redis.asyncio as redis

        client = redis.Redis.from_url(REDIS_URL)
        try:
            return int(await client.llen(f"{env.namespace}:{queue}"))
        finally:
            await client.aclose()

    def passive() -> int:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        try:
            return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
        finally:
            connection.close()

    return await asyncio.to_thread(passive)


def _no_reconciler() -> dict[str, Any]:
    """Settings that keep billing's payment reconciler (which also finishes pending payments) out of
    the test's time: only redelivery may finish them here."""
    if "billing_reconcile_after_seconds" in Settings.model_fields:
        return {"billing_reconcile_after_seconds": 3600.0}
    return {}


async def _kill_and_restart(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]], **overrides: Any
) -> None:
    async with private_production(tmp_path, pg_database_factory, payments_timeout=15.0,
                                  worker_metrics_port=free_port("127.0.0.1"),
                                  **_no_reconciler(), **overrides) as env:
        settings = Settings(**env.values)
        try:
            await _scenario(env, settings)
        finally:
            if settings.broker_backend == "rabbitmq":
                await asyncio.to_thread(delete_rabbitmq_queues, env.namespace)


async def _scenario(env: Private, settings: Settings) -> None:
    first = await env.start_worker()
    async with env.api() as stack:
        customers = await _customers(stack)
        queue = stack.container.jobs().queue_of(CHARGE_TASK)
        holds = [env.gateway.hold_after_charge() for _ in range(IN_FLIGHT)]
        payments: list[str] = []
        for headers, _, invoice in customers:
            accepted = await pay(stack, headers, invoice["id"])
            assert accepted.status_code == 202, accepted.text
            payments.append(accepted.json()["id"])

        for hold in holds:  # in flight: charged at the gateway, the worker waiting for the answer
            assert await asyncio.to_thread(hold.charged.wait, 20), env.log_of(first)[-3000:]
        # The rest of what the worker took waits in its memory: prefetched.
        await eventually(lambda: _is(_ready_messages(env, queue), PAYMENTS - TAKEN), within=10)
        os.kill(first.pid, signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
        killed = time.monotonic()
        for hold in holds:
            hold.release()
        assert first.returncode == -signal.SIGKILL
        assert len(env.gateway.ledger.successful_charges()) == IN_FLIGHT
        for (headers, _, _), payment_id in zip(customers, payments, strict=True):
            assert (await payment_of(stack, headers, payment_id))["status"] == "pending"  # none committed

        second = await env.start_worker()
        restarted = time.monotonic()
        limit = bound(settings)
        await eventually(lambda: _all_settled(stack, customers, payments), within=limit)
        done = time.monotonic()
        print(f"\n{settings.broker_backend}: {PAYMENTS} payments settled {done - restarted:.1f} s after "
              f"the restart ({done - killed:.1f} s after the kill; bound {limit:.0f} s)")

        for (headers, _, invoice), payment_id in zip(customers, payments, strict=True):
            assert (await payment_of(stack, headers, payment_id))["status"] == "succeeded"
            assert await invoice_status(stack, headers, invoice["id"]) == "paid"
            assert len(env.gateway.ledger.successful_charges(payment_id)) == 1, payment_id
        assert len(env.gateway.ledger.successful_charges()) == PAYMENTS  # one charge per payment, any key
        emails = [email for _, email, _ in customers]
        await eventually(lambda: all(receipts(stack, e) == 1 for e in emails), within=10)
        await holds_for(lambda: all(receipts(stack, e) == 1 for e in emails), 1.0)

        # The second worker saw again what the first had started (both brokers) or taken (RabbitMQ).
        seen = (await asyncio.to_thread(redelivered, settings.worker_metrics_port)).get(CHARGE_TASK, 0)
        expected = IN_FLIGHT if settings.broker_backend == "redis" else TAKEN
        assert seen == expected, (seen, env.log_of(second)[-3000:])
        await env.stop_worker(second)
    assert not env.server_errors(), env.server_errors()


async def _customers(stack: Stack) -> list[tuple[dict[str, str], str, dict[str, Any]]]:
    """One admin-made item and ``PAYMENTS`` customers with an open invoice each."""
    admin = bearer(await make_admin(stack))
    item = await new_item(stack, admin, 1250)
    found = []
    for _ in range(PAYMENTS):
        user, token = await sign_up(stack.client, full_name="Crash Customer")
        found.append((bearer(token), user["email"], await new_invoice(stack, bearer(token), (item, 1))))
    return found


async def _all_settled(stack: Stack, customers: list[tuple[dict[str, str], str, dict[str, Any]]],
                       payments: list[str]) -> bool:
    for (headers, _, _), payment_id in zip(customers, payments, strict=True):
        if (await payment_of(stack, headers, payment_id))["status"] == "pending":
            return False
    return True


async def _is(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_redis_broker_redelivers_what_a_killed_worker_held_within_the_bound(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    await _kill_and_restart(tmp_path, pg_database_factory)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.rabbitmq
async def test_rabbitmq_redelivers_what_a_killed_worker_held_within_the_bound(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    require("rabbitmq")
    await _kill_and_restart(tmp_path, pg_database_factory, broker_backend="rabbitmq", broker_url=RABBITMQ_URL)
