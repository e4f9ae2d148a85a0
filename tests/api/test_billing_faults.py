"""Billing under faults: "charged at most once" must hold when things go wrong.

- a burst of identical requests (one Idempotency-Key) makes one payment and one charge;
- the same job message delivered twice (one delivery still in flight) charges once;
- a real ``atrium worker`` killed with SIGKILL between the charge and its commit: a new worker
  replays the charge with the same idempotency key, the payment completes once, one receipt;
- the broker down when a payment is accepted: the request succeeds, the job waits in the outbox
  and is delivered once the broker is back;
- retries running out: the message is dead-lettered and the payment fails with a reason.

The first two run on the session ``stack`` (both profiles). The others build a private
environment of their own (database, gateway, SMTP server, broker namespace or even a private
``redis-server``) so that killing or stopping something never touches the shared stack.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from dramatiq import Message
from sqlalchemy import select, text

from core.db.base import utcnow
from core.db.session import UnitOfWork
from core.messaging.outbox import EVENT, JOB, OutboxMessage
from core.security import Principal
from main import create_app
from modules.billing.adapters.gateway import FakePaymentGateway
from tests.support.api import bearer, make_admin, sign_up
from tests.support.billing import (
    INVOICES,
    customer_with_invoice,
    invoice_status,
    new_invoice,
    new_item,
    pay,
    payment_of,
    receipts,
    settled,
)
from tests.support.production import private_production
from tests.support.redis_server import RedisServer, require_redis_server
from tests.support.services import REDIS_URL
from tests.support.settings import CHEAP_HASHING, make_settings
from tests.support.stack import Gateway, Stack, serve
from tests.support.waiting import eventually, holds_for

CHARGE_TASK = "billing.charge_payment"
User = tuple[dict[str, str], str]  # (auth headers, email)
PAYMENT_FAILED = "billing.PaymentFailed"


# --- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def admin(stack: Stack) -> dict[str, str]:
    return bearer(await make_admin(stack))


@pytest.fixture
async def alice(stack: Stack) -> User:
    """A fresh user per test: (auth headers, email), so mail counts are the test's own."""
    user, token = await sign_up(stack.client, full_name="Alice Example")
    return bearer(token), user["email"]


async def outbox_rows(stack: Stack, name: str, payment_id: str) -> list[OutboxMessage]:
    """The outbox rows named ``name`` whose payload is about ``payment_id``."""
    async with stack.container.sessions()() as session:
        rows = (await session.scalars(select(OutboxMessage).where(OutboxMessage.name == name))).all()
    return [row for row in rows if row.payload.get("payment_id") == payment_id]


async def the_charge_job(stack: Stack, payment_id: str) -> OutboxMessage:
    [row] = await outbox_rows(stack, CHARGE_TASK, payment_id)
    assert row.kind == JOB
    return row


def as_message(stack: Stack, row: OutboxMessage) -> Message[Any]:
    """The broker message of an outbox job row, built exactly as ``OutboxRelay`` builds it."""
    return Message(
        queue_name=stack.container.jobs().queue_of(row.name),
        actor_name=row.name,
        args=(),
        kwargs={"message_id": str(row.id), "request_id": row.request_id, "payload": row.payload},
        options={},
    )


# --- 1. a burst of identical requests ------------------------------------------------------------


class TestConcurrentDuplicates:
    async def test_fifty_identical_requests_make_one_payment_and_one_charge(
        self, stack: Stack, admin: dict[str, str], alice: User
    ) -> None:
        headers, _ = alice
        invoice = await new_invoice(stack, headers, (await new_item(stack, admin, 990), 1))
        key = f"burst-{uuid.uuid4()}"

        responses = await asyncio.gather(*(pay(stack, headers, invoice["id"], key=key) for _ in range(50)))

        odd = [(r.status_code, r.text) for r in responses if r.status_code != 202]
        assert not odd, f"{len(odd)} of 50 were not 202, e.g. {odd[:3]}"
        assert len({json.dumps(r.json(), sort_keys=True) for r in responses}) == 1, "the answers differ"
        assert len({r.headers["location"] for r in responses}) == 1
        # Exactly one request ran the use case; the other 49 replayed its answer.
        assert [r.headers.get("idempotent-replayed") for r in responses].count(None) == 1
        payment = responses[0].json()
        assert (payment["status"], payment["amount"]) == ("pending", 990)
        assert payment["invoice_id"] == invoice["id"]

        assert (await settled(stack, headers, payment["id"]))["status"] == "succeeded"
        listed = (await stack.client.get(f"{INVOICES}/{invoice['id']}/payments", headers=headers)).json()
        assert [p["id"] for p in listed["payments"]] == [payment["id"]]
        assert len(stack.gateway.ledger.successful_charges(payment["id"])) == 1
        assert stack.gateway.ledger.requests.count(payment["id"]) == 1
        assert await invoice_status(stack, headers, invoice["id"]) == "paid"


# --- 2. one message delivered twice ----------------------------------------------------------------


async def inbox_claims_waiting(stack: Stack) -> int:
    """Backends of this database waiting on a lock while inserting an inbox claim."""
    async with stack.container.sessions()() as session:
        return int(await session.scalar(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query ILIKE '%inbox_messages%'"
        )) or 0)


class TestDuplicateDelivery:
    async def test_a_message_delivered_again_while_in_flight_charges_once(
        self, stack: Stack, admin: dict[str, str], alice: User
    ) -> None:
        if stack.profile == "development":
            await self._development(stack, admin, alice)
        else:
            await self._production(stack, admin, alice)

    async def _production(self, stack: Stack, admin: dict[str, str], alice: User) -> None:
        headers, email = alice
        invoice = await new_invoice(stack, headers, (await new_item(stack, admin, 700), 1))
        assert stack.gateway_server is not None
        assert stack.worker_log is not None
        log = stack.worker_log
        handle = stack.gateway_server.hold_after_charge()
        try:
            payment_id = (await pay(stack, headers, invoice["id"])).json()["id"]
            assert await asyncio.to_thread(handle.charged.wait, 20), "the job never reached the gateway"
            # The first delivery has charged and is waiting for the gateway's answer, its inbox
            # claim not yet committed. The same message arrives twice more.
            row = await the_charge_job(stack, payment_id)
            broker = stack.container.broker()
            for _ in range(2):
                await asyncio.to_thread(broker.enqueue, as_message(stack, row))
            # A duplicate reaches the worker while the first is in flight: it waits on the first's
            # inbox claim. (Release well within the adapter's 2 s timeout, or it would retry.)
            await eventually(lambda: _positive(inbox_claims_waiting(stack)), within=1.5)
        finally:
            handle.release()

        assert (await settled(stack, headers, payment_id))["status"] == "succeeded"
        skipped = f"message {row.id} already processed"
        await eventually(lambda: log.read_text(errors="replace").count(skipped) == 2)  # both duplicates
        assert len(stack.gateway.ledger.successful_charges(payment_id)) == 1
        assert stack.gateway.ledger.requests.count(payment_id) == 1
        assert [k for k, _ in stack.gateway_server.requests].count(payment_id) == 1
        await eventually(lambda: receipts(stack, email) == 1, within=15)
        await holds_for(lambda: receipts(stack, email) == 1, 1.0)
        assert await invoice_status(stack, headers, invoice["id"]) == "paid"

    async def _development(self, stack: Stack, admin: dict[str, str], alice: User) -> None:
        headers, email = alice
        invoice = await new_invoice(stack, headers, (await new_item(stack, admin, 700), 1))
        me = (await stack.client.get("/api/v1/users/me", headers=headers)).json()
        # Accept the payment through the service, and take its job row out of the relay's hands
        # (as if the relay had just sent it): this test delivers the message itself, twice at once.
        async with UnitOfWork(stack.container.sessions()) as session:
            payment = await stack.container.billing.payments().start(
                session, Principal(uuid.UUID(me["id"]), False), uuid.UUID(invoice["id"]), "tok_visa")
            [row] = [o for o in session.new if isinstance(o, OutboxMessage) and o.name == CHARGE_TASK]
            row.published_at = utcnow()
        payment_id = str(payment.id)
        assert row.payload == {"payment_id": payment_id}
        jobs = stack.container.jobs()

        ran = await asyncio.gather(*(jobs.execute(CHARGE_TASK, str(row.id), row.request_id, row.payload)
                                     for _ in range(2)))

        assert sorted(ran) == [False, True], ran
        assert (await payment_of(stack, headers, payment_id))["status"] == "succeeded"
        assert len(stack.gateway.ledger.successful_charges(payment_id)) == 1
        assert stack.gateway.ledger.requests.count(payment_id) == 1
        assert await jobs.execute(CHARGE_TASK, str(row.id), row.request_id, row.payload) is False
        assert stack.gateway.ledger.requests.count(payment_id) == 1
        await eventually(lambda: receipts(stack, email) == 1, within=15)
        await holds_for(lambda: receipts(stack, email) == 1, 1.0)


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0


# --- 3. a worker killed mid-job ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_a_worker_killed_after_charging_completes_the_payment_once_after_restart(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    async with private_production(
        tmp_path, pg_database_factory, broker_heartbeat_timeout_ms=1000, broker_maintenance_chance=1_000_000,
    ) as env:
        first = await env.start_worker()
        async with env.api() as stack:
            headers, email, invoice = await customer_with_invoice(stack)
            handle = env.gateway.hold_after_charge()
            accepted = await pay(stack, headers, invoice["id"])
            assert accepted.status_code == 202, accepted.text
            payment_id = accepted.json()["id"]

            assert await asyncio.to_thread(handle.charged.wait, 20), env.log_of(first)[-3000:]
            os.kill(first.pid, signal.SIGKILL)  # charged at the gateway, nothing committed here
            await asyncio.to_thread(first.wait, 10)
            handle.release()
            assert first.returncode == -signal.SIGKILL
            assert (await payment_of(stack, headers, payment_id))["status"] == "pending"
            assert len(env.gateway.ledger.successful_charges(payment_id)) == 1

            second = await env.start_worker()
            done = await settled(stack, headers, payment_id)

            assert done["status"] == "succeeded", done
            assert await invoice_status(stack, headers, invoice["id"]) == "paid"
            assert len(env.gateway.ledger.successful_charges(payment_id)) == 1
            assert len(env.gateway.ledger.successful_charges()) == 1  # this gateway's only charge, any key
            # The message came back after the crash and the charge was replayed with the same key.
            assert env.gateway.ledger.requests.count(payment_id) >= 2
            await eventually(lambda: receipts(stack, email) == 1, within=15)
            await holds_for(lambda: receipts(stack, email) == 1, 1.0)
            await env.stop_worker(second)
        assert not env.server_errors()


# --- 4. the broker down when a payment is accepted ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_a_payment_accepted_while_the_broker_is_down_is_charged_once_it_is_back(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    require_redis_server("the private broker")
    with RedisServer() as broker:
        async with private_production(tmp_path, pg_database_factory, broker_url=broker.url) as env:
            async with env.api() as stack:
                headers, email, invoice = await customer_with_invoice(stack)
                assert (await stack.client.get("/health/ready")).status_code == 200

                broker.stop()
                accepted = await pay(stack, headers, invoice["id"])

                assert accepted.status_code == 202, accepted.text
                payment_id = accepted.json()["id"]
                assert accepted.json()["status"] == "pending"
                ready = await stack.client.get("/health/ready")
                assert ready.status_code == 503, ready.text
                checks = ready.json()["error"]["details"]["checks"]
                assert (checks["broker"]["status"], checks["database"]["status"]) == ("down", "ok")

                async def tried_and_kept() -> bool:
                    row = await the_charge_job(stack, payment_id)
                    return row.published_at is None and row.attempts >= 1 and bool(row.last_error)

                await eventually(tried_and_kept, within=10)
                assert (await payment_of(stack, headers, payment_id))["status"] == "pending"

                broker.start()  # the same port, empty
                worker = await env.start_worker()

                async def published() -> bool:
                    return (await the_charge_job(stack, payment_id)).published_at is not None

                await eventually(published, within=10)
                assert (await settled(stack, headers, payment_id))["status"] == "succeeded"
                assert await invoice_status(stack, headers, invoice["id"]) == "paid"
                assert len(env.gateway.ledger.successful_charges(payment_id)) == 1
                assert len(env.gateway.ledger.successful_charges()) == 1
                assert env.gateway.ledger.requests.count(payment_id) == 1
                await eventually(lambda: receipts(stack, email) == 1, within=15)
                assert (await stack.client.get("/health/ready")).status_code == 200
                await env.stop_worker(worker)
            assert not env.server_errors(), env.server_errors()


# --- 5. retries exhausted ----------------------------------------------------------------------------


async def test_exhausted_retries_dead_letter_the_job_and_fail_the_payment(tmp_path: Path) -> None:
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'exhausted.db'}",
                             job_max_retries=2, job_min_backoff_ms=10, job_max_backoff_ms=50, **CHEAP_HASHING)
    app = create_app(settings)
    async with serve(app) as client:
        container = app.state.container
        fake: FakePaymentGateway = container.billing.payment_gateway()
        sender = container.email_sender()
        stack = Stack(
            profile="development", settings=settings, app=app, client=client,
            wait_for_mail=lambda to: sender.wait_for(lambda m: m.to == to),
            mail_count=lambda to: sum(1 for m in sender.sent if m.to == to),
            gateway=Gateway(fake.ledger, fake.fail_next, lambda: []),
            mails=lambda to: [(m.subject, m.body) for m in sender.sent if m.to == to],
        )
        headers, _, invoice = await customer_with_invoice(stack)
        fake.fail_next(1000)

        accepted = await pay(stack, headers, invoice["id"])
        assert accepted.status_code == 202, accepted.text
        payment_id = accepted.json()["id"]
        failed = await settled(stack, headers, payment_id)

        assert (failed["status"], failed["failure_code"]) == ("failed", "gateway_unavailable"), failed
        assert failed["failure_message"]
        assert await invoice_status(stack, headers, invoice["id"]) == "open"
        assert fake.ledger.successful_charges(payment_id) == []
        row = await the_charge_job(stack, payment_id)
        broker = container.broker()

        def dead() -> list[Any]:
            return [m for m in broker.dead_letters if m.kwargs.get("message_id") == str(row.id)]

        await eventually(lambda: len(dead()) == 1)
        assert dead()[0].actor_name == CHARGE_TASK
        assert dead()[0].options["retries"] == settings.job_max_retries + 1  # every attempt was made
        [event] = await outbox_rows(stack, PAYMENT_FAILED, payment_id)
        assert event.kind == EVENT
        assert event.payload["failure_code"] == "gateway_unavailable"

        fake.fail_next(0)
        retried = await pay(stack, headers, invoice["id"])
        assert retried.status_code == 202, retried.text
        assert retried.json()["id"] != payment_id
        assert (await settled(stack, headers, retried.json()["id"]))["status"] == "succeeded"
        assert await invoice_status(stack, headers, invoice["id"]) == "paid"
        assert len(fake.ledger.successful_charges(retried.json()["id"])) == 1


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_exhausted_retries_on_the_redis_broker_land_in_its_dead_letter_set(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    async with private_production(tmp_path, pg_database_factory, job_max_retries=1) as env:
        worker = await env.start_worker()
        async with env.api() as stack:
            headers, _, invoice = await customer_with_invoice(stack)
            env.gateway.fail_next(100)

            payment_id = (await pay(stack, headers, invoice["id"])).json()["id"]
            failed = await settled(stack, headers, payment_id)

            assert (failed["status"], failed["failure_code"]) == ("failed", "gateway_unavailable"), failed
            assert await invoice_status(stack, headers, invoice["id"]) == "open"
            assert env.gateway.ledger.successful_charges(payment_id) == []
            # Two job attempts (max_retries=1), each making the adapter's three HTTP attempts.
            attempts = 2 * stack.settings.payments_max_attempts
            assert [k for k, _ in env.gateway.requests].count(payment_id) == attempts
            row = await the_charge_job(stack, payment_id)
            # dramatiq's RedisBroker keeps dead messages in "<ns>:<queue>.XQ" (ids by time) and
            # "<ns>:<queue>.XQ.msgs" (id -> encoded message).
            import redis.asyncio as redis

            dead_set = f"{env.namespace}:{stack.container.jobs().queue_of(CHARGE_TASK)}.XQ"
            client = redis.Redis.from_url(REDIS_URL)
            try:
                async def dead_lettered() -> list[Message[Any]]:
                    encoded = await client.hgetall(f"{dead_set}.msgs")
                    return [m for m in map(Message.decode, encoded.values())
                            if m.kwargs.get("message_id") == str(row.id)]

                await eventually(lambda: _nonempty(dead_lettered()))
                [message] = await dead_lettered()
                assert await client.zcard(dead_set) == 1
            finally:
                await client.aclose()
            assert message.actor_name == CHARGE_TASK
            # Redis dead-letters the copy last enqueued: the retry, which counts one retry.
            assert message.options["retries"] == stack.settings.job_max_retries == 1
            assert len(await outbox_rows(stack, PAYMENT_FAILED, payment_id)) == 1

            env.gateway.fail_next(0)
            retried = (await pay(stack, headers, invoice["id"])).json()["id"]
            assert (await settled(stack, headers, retried))["status"] == "succeeded"
            await env.stop_worker(worker)
        assert not env.server_errors(), env.server_errors()


async def _nonempty(found: Awaitable[list[Any]]) -> bool:
    return bool(await found)
