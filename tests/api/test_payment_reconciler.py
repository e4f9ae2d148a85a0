"""Nothing stays pending: a real ``atrium worker`` finishes payments whose charge job was lost.

A private production-like environment (its own database, gateway, SMTP server and Redis broker
namespace). Six payments are left ``pending`` with their ``billing.charge_payment`` messages gone
for good (the broker namespace is wiped after the outbox sent them), in every state a crash can
leave them at the gateway:

- charged by a worker SIGKILLed before it could record the charge;
- charged (or declined) at the gateway by a job whose worker died, simulated on the gateway itself;
- never seen by the gateway (charged, or declined, by the reconciler now, with the payment's key).

A new worker, whose reconciler treats 2 s without a change as stuck, finishes all of them: every
payment ``succeeded`` or ``failed``, one gateway charge per payment, one receipt per paid invoice,
and ``atrium_payments_reconciled_total`` counts each outcome.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from core.messaging.outbox import OutboxMessage
from modules.billing.adapters.gateway import ChargeRequest
from tests.support.api import bearer, make_admin, sign_up
from tests.support.billing import invoice_status, new_invoice, new_item, pay, payment_of, receipts
from tests.support.production import private_production
from tests.support.redis_namespace import flush_redis_namespace
from tests.support.smtp import free_port
from tests.support.stack import Stack
from tests.support.waiting import eventually, holds_for

CHARGE_TASK = "billing.charge_payment"
AFTER, INTERVAL = 2.0, 0.5


async def _all_published(stack: Stack, payment_ids: list[str]) -> bool:
    """Every payment's charge job has left the outbox for the broker."""
    async with stack.container.sessions()() as session:
        rows = (await session.scalars(select(OutboxMessage).where(OutboxMessage.name == CHARGE_TASK))).all()
    sent = {row.payload["payment_id"] for row in rows if row.published_at is not None}
    return set(payment_ids) <= sent


def _reconciled(metrics_text: str) -> dict[str, float]:
    pattern = re.compile(r'^atrium_payments_reconciled_total\{outcome="([a-z_]+)"\} ([0-9.e+]+)$', re.M)
    return {outcome: float(value) for outcome, value in pattern.findall(metrics_text)}


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_a_worker_finishes_every_payment_whose_charge_job_was_lost(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    metrics_port = free_port()
    async with private_production(
        tmp_path, pg_database_factory, billing_reconcile_after_seconds=AFTER,
        billing_reconcile_interval_seconds=INTERVAL, worker_metrics_port=metrics_port,
    ) as env:
        first = await env.start_worker()
        async with env.api() as stack:
            admin = bearer(await make_admin(stack))
            user, token = await sign_up(stack.client, full_name="Alice Example")
            headers, email = bearer(token), user["email"]
            item = await new_item(stack, admin, 1250)
            tokens = {"killed": "tok_visa", "charged": "tok_visa", "declined": "tok_chargeDeclined",
                      "new": "tok_visa", "new2": "tok_mastercard", "new_declined": "tok_expiredCard"}
            invoices = {name: await new_invoice(stack, headers, (item, 2)) for name in tokens}

            # 1. A worker charges at the gateway and is SIGKILLed before recording it.
            handle = env.gateway.hold_after_charge()
            killed = await pay(stack, headers, invoices["killed"]["id"], tokens["killed"])
            assert killed.status_code == 202, killed.text
            assert await asyncio.to_thread(handle.charged.wait, 20), env.log_of(first)[-3000:]
            os.kill(first.pid, signal.SIGKILL)
            await asyncio.to_thread(first.wait, 10)
            handle.release()

            # 2. With no worker running, the others are accepted and their jobs sent to the broker.
            payments = {"killed": killed.json()}
            for name in list(tokens)[1:]:
                accepted = await pay(stack, headers, invoices[name]["id"], tokens[name])
                assert accepted.status_code == 202, accepted.text
                payments[name] = accepted.json()
            ids = {name: p["id"] for name, p in payments.items()}
            for name in ("charged", "declined"):  # a job that reached the gateway, then died
                env.gateway.ledger.charge(ChargeRequest(ids[name], 2500, "EUR", tokens[name]))
            await eventually(lambda: _all_published(stack, list(ids.values())), within=10)

            # 3. Every message is lost: the broker's namespace is wiped.
            await flush_redis_namespace(env.namespace)
            assert all([(await payment_of(stack, headers, i))["status"] == "pending" for i in ids.values()])

            # 4. A new worker's reconciler finishes them all, within the threshold plus a few intervals.
            started = time.monotonic()
            second = await env.start_worker()

            async def none_pending() -> bool:
                found = [(await payment_of(stack, headers, i))["status"] for i in ids.values()]
                return "pending" not in found

            await eventually(none_pending, within=AFTER + 15)
            elapsed = time.monotonic() - started
            statuses = {name: (await payment_of(stack, headers, i))["status"] for name, i in ids.items()}
            assert statuses == {"killed": "succeeded", "charged": "succeeded", "declined": "failed",
                                "new": "succeeded", "new2": "succeeded", "new_declined": "failed"}, statuses
            paid = {name for name, status in statuses.items() if status == "succeeded"}
            for name, invoice in invoices.items():
                expected = "paid" if name in paid else "open"
                assert await invoice_status(stack, headers, invoice["id"]) == expected, name
            ledger = env.gateway.ledger
            for name, payment_id in ids.items():
                assert ledger.requests.count(payment_id) == 1, name  # charged once, by whoever charged
                assert len(ledger.successful_charges(payment_id)) == (1 if name in paid else 0), name
            assert len(ledger.successful_charges()) == len(paid)
            await eventually(lambda: receipts(stack, email) == len(paid), within=15)
            await holds_for(lambda: receipts(stack, email) == len(paid), 1.0)

            async with httpx.AsyncClient() as client:
                page = (await client.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            counts = {k: v for k, v in _reconciled(page).items() if v}
            assert counts == {"charged_found": 2, "declined_found": 1, "charged_now": 2, "declined_now": 1}, (
                counts, elapsed)
            log = env.log_of(second)
            assert log.count("reconcile: payment") == len(ids), log[-3000:]
            await env.stop_worker(second)
        assert not env.server_errors(), env.server_errors()
