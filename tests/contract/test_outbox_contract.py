"""The outbox, the inbox and the relay behave the same on SQLite and on PostgreSQL.

Writing (``Outbox``) and claiming (``Inbox``) run in the rollback-isolated ``session`` fixture. The
relay opens its own sessions, so its tests use committed data through a production-configured
``async_sessionmaker``, each on a migrated database of its own per backend (a fresh SQLite file, a
fresh PostgreSQL database), deleted or dropped afterwards: nothing is ever cleaned up by deleting
rows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from dramatiq import Message
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from core.db.engine import create_engine
from core.db.session import UnitOfWork, commit, rollback, session_factory
from core.messaging.events import IntegrationEvent
from core.messaging.outbox import EVENT, JOB, Inbox, InboxMessage, Outbox, OutboxMessage, OutboxRelay
from core.observability.context import request_id_var


class Happened(IntegrationEvent):
    name = "contract.Happened"

    subject: str


class Unheard(IntegrationEvent):
    name = "contract.Unheard"


class Note(BaseModel):
    key: str
    n: int


class Notify:
    """The after-commit hook: counts how often it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


@pytest.fixture
def notify() -> Notify:
    return Notify()


@pytest.fixture
def outbox(notify: Notify) -> Outbox:
    return Outbox(notify=notify)


async def _row(session: AsyncSession, row_id: uuid.UUID) -> OutboxMessage | None:
    statement = select(OutboxMessage).where(OutboxMessage.id == row_id)
    return (await session.execute(statement)).scalar_one_or_none()


# --- writing: Outbox.publish / Outbox.enqueue --------------------------------------------------


class TestPublish:
    async def test_adds_an_event_row_to_the_callers_session(
        self, session: AsyncSession, outbox: Outbox, notify: Notify
    ) -> None:
        event = Happened(subject="s-1")
        outbox.publish(session, event)
        await session.flush()

        row = await _row(session, event.event_id)

        assert row is not None
        assert (row.kind, row.name) == (EVENT, "contract.Happened")
        assert row.payload["event_id"] == str(event.event_id)
        assert row.payload["subject"] == "s-1"
        assert row.request_id == "-"
        assert row.published_at is None
        assert row.attempts == 0
        assert row.last_error is None
        assert notify.calls == 0  # nothing leaves before the commit

    async def test_the_stored_payload_validates_back_into_the_same_event(
        self, session: AsyncSession, outbox: Outbox
    ) -> None:
        event = Happened(subject="round trip")
        outbox.publish(session, event)
        await session.flush()
        session.expunge_all()

        row = await _row(session, event.event_id)

        assert row is not None
        assert Happened.model_validate(row.payload) == event
        assert row.created_at.utcoffset() == timedelta(0)

    async def test_records_the_request_id_of_the_work_in_progress(
        self, session: AsyncSession, outbox: Outbox
    ) -> None:
        event = Happened(subject="traced")
        token = request_id_var.set("req-contract-0001")
        try:
            outbox.publish(session, event)
        finally:
            request_id_var.reset(token)
        await session.flush()

        row = await _row(session, event.event_id)
        assert row is not None
        assert row.request_id == "req-contract-0001"

    async def test_keeps_the_trace_context_of_the_writer_or_none(
        self, session: AsyncSession, outbox: Outbox
    ) -> None:
        untraced = Happened(subject="tracing off")
        outbox.publish(session, untraced)  # tracing is off here: nothing to store
        traceparent = f"00-{'ab' * 16}-{'cd' * 8}-01"  # the longest there is: 55 characters
        tracestate = "vendor=" + "x" * 505  # the column's full width: 512 characters
        traced = OutboxMessage(kind=EVENT, name="contract.Happened", payload={}, traceparent=traceparent,
                               tracestate=tracestate)
        session.add(traced)
        await session.flush()
        session.expunge_all()

        row = await _row(session, untraced.event_id)
        assert row is not None
        assert (row.traceparent, row.tracestate, row.trace_context()) == (None, None, {})
        row = await _row(session, traced.id)
        assert row is not None
        assert row.trace_context() == {"traceparent": traceparent, "tracestate": tracestate}
        assert (len(row.traceparent or ""), len(row.tracestate or "")) == (55, 512)

    async def test_commit_runs_the_after_commit_hook_once(
        self, session: AsyncSession, outbox: Outbox, notify: Notify
    ) -> None:
        first, second = Happened(subject="a"), Happened(subject="b")
        outbox.publish(session, first)
        outbox.publish(session, second)
        assert notify.calls == 0
        await commit(session)

        assert notify.calls == 1  # one wake-up per transaction, however many rows
        assert await _row(session, first.event_id) is not None
        assert await _row(session, second.event_id) is not None

        await commit(session)  # a later transaction without outbox rows wakes nobody
        assert notify.calls == 1

    async def test_rollback_drops_the_row_and_never_runs_the_hook(
        self, session: AsyncSession, outbox: Outbox, notify: Notify
    ) -> None:
        event = Happened(subject="never")
        outbox.publish(session, event)
        await session.flush()
        assert await _row(session, event.event_id) is not None

        await rollback(session)

        assert await _row(session, event.event_id) is None
        assert notify.calls == 0
        await commit(session)  # the hook of the rolled-back transaction is gone for good
        assert notify.calls == 0

    async def test_without_notify_nothing_is_registered(self, session: AsyncSession) -> None:
        event = Happened(subject="quiet")
        Outbox().publish(session, event)
        await session.flush()

        assert await _row(session, event.event_id) is not None
        assert "after_commit" not in session.info


class TestEnqueue:
    async def test_adds_a_job_row_with_the_dumped_payload(
        self, session: AsyncSession, outbox: Outbox
    ) -> None:
        outbox.enqueue(session, "contract.record", Note(key="k-1", n=1))
        outbox.enqueue(session, "contract.record", {"key": "k-2", "n": 2})
        await session.flush()

        rows = (await session.scalars(
            select(OutboxMessage).where(OutboxMessage.name == "contract.record", OutboxMessage.kind == JOB)
        )).all()

        payloads = sorted((r.payload for r in rows), key=lambda p: p["key"])
        assert payloads == [{"key": "k-1", "n": 1}, {"key": "k-2", "n": 2}]
        assert len({r.id for r in rows}) == 2
        assert all(r.id.version == 7 and r.published_at is None and r.attempts == 0 for r in rows)

    async def test_registers_the_after_commit_hook(
        self, session: AsyncSession, outbox: Outbox, notify: Notify
    ) -> None:
        outbox.enqueue(session, "contract.record", Note(key="k", n=0))
        assert notify.calls == 0
        await commit(session)
        assert notify.calls == 1

    async def test_rollback_drops_the_job(
        self, session: AsyncSession, outbox: Outbox, notify: Notify
    ) -> None:
        key = uuid.uuid4().hex
        outbox.enqueue(session, "contract.record", Note(key=key, n=0))
        await session.flush()
        await rollback(session)

        rows = (await session.scalars(select(OutboxMessage).where(OutboxMessage.kind == JOB))).all()
        count = sum(1 for r in rows if r.payload.get("key") == key)
        assert count == 0
        assert notify.calls == 0


class TestFixtureCommit:
    """What ``commit(session)`` does inside the rollback-isolated ``session`` fixture: it releases
    the session's savepoint and runs the hooks, but nothing reaches the database for good (on
    SQLite this needs ``core.db.session.create_engine``'s explicit BEGIN; pysqlite's own handling made the
    savepoint the outermost transaction, so its RELEASE committed to the shared file).

    The ``session`` fixture runs here on a database of the test's own, so a leak fails the test
    without leaving a row in a database other tests share."""

    @pytest.fixture(params=["sqlite", "postgres"])
    def database_url(self, request: pytest.FixtureRequest) -> str:
        return request.getfixturevalue(f"private_{request.param}_url")

    async def test_a_commit_stays_inside_the_outer_transaction(
        self, session: AsyncSession, outbox: Outbox, notify: Notify, database_url: str
    ) -> None:
        event = Happened(subject="isolated?")
        outbox.publish(session, event)
        await commit(session)
        assert notify.calls == 1  # the hook runs although only a savepoint was released

        other = create_async_engine(database_url)
        try:
            async with other.connect() as connection:
                seen = await connection.scalar(
                    select(func.count()).select_from(OutboxMessage).where(OutboxMessage.id == event.event_id)
                )
        finally:
            await other.dispose()
        assert seen == 0


# --- Inbox.claim ---------------------------------------------------------------------------------


class TestInboxClaim:
    async def test_first_claim_wins_and_a_repeat_is_refused(self, session: AsyncSession) -> None:
        inbox, message_id = Inbox(), str(uuid.uuid4())

        assert await inbox.claim(session, message_id, "contract.record") is True
        assert await inbox.claim(session, message_id, "contract.record") is False
        assert await inbox.claim(session, message_id, "contract.record") is False

    async def test_another_consumer_of_the_same_message_claims_its_own(self, session: AsyncSession) -> None:
        inbox, message_id = Inbox(), str(uuid.uuid4())

        assert await inbox.claim(session, message_id, "contract.record") is True
        assert await inbox.claim(session, message_id, "contract.audit") is True
        assert await inbox.claim(session, message_id, "contract.audit") is False

    async def test_another_message_for_the_same_consumer_is_claimed(self, session: AsyncSession) -> None:
        inbox = Inbox()
        assert await inbox.claim(session, str(uuid.uuid4()), "contract.record") is True
        assert await inbox.claim(session, str(uuid.uuid4()), "contract.record") is True

    async def test_a_claim_is_a_row_in_the_callers_transaction(self, session: AsyncSession) -> None:
        message_id = str(uuid.uuid4())
        await Inbox().claim(session, message_id, "contract.record")

        statement = select(InboxMessage).where(InboxMessage.message_id == message_id)
        rows = (await session.scalars(statement)).all()
        assert [(r.message_id, r.consumer) for r in rows] == [(message_id, "contract.record")]
        assert rows[0].processed_at.utcoffset() == timedelta(0)


# --- committed data: a migrated database of each test's own, per backend ------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def relay_database(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend, url) of a fresh migrated database, dropped after the test: isolation by database."""
    return request.param, request.getfixturevalue(f"private_{request.param}_url")


@pytest.fixture
async def sessions(relay_database: tuple[str, str]) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions configured as in production, on an empty outbox and inbox of the test's own."""
    engine = create_engine(relay_database[1], pool_size=5)
    yield session_factory(engine)
    await engine.dispose()


async def _write(sessions: async_sessionmaker[AsyncSession], *writes: Callable[[AsyncSession], None]) -> None:
    async with UnitOfWork(sessions) as session:
        for write in writes:
            write(session)


async def _jobs(sessions: async_sessionmaker[AsyncSession], count: int) -> None:
    """``count`` jobs ``{"i": 0..count-1}`` for ``contract.record``, in one transaction."""
    async with UnitOfWork(sessions) as session:
        for i in range(count):
            Outbox().enqueue(session, "contract.record", {"i": i})


async def _rows(sessions: async_sessionmaker[AsyncSession]) -> list[OutboxMessage]:
    async with sessions() as session:
        return list((await session.scalars(select(OutboxMessage).order_by(OutboxMessage.id))).all())


class TestInboxAcrossTransactions:
    async def test_a_committed_claim_is_refused_in_a_later_transaction(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        inbox, message_id = Inbox(), str(uuid.uuid4())
        async with UnitOfWork(sessions) as session:
            assert await inbox.claim(session, message_id, "contract.record") is True

        async with UnitOfWork(sessions) as session:
            assert await inbox.claim(session, message_id, "contract.record") is False
            assert await inbox.claim(session, message_id, "contract.audit") is True

    async def test_a_rolled_back_claim_can_be_made_again(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        """A job that failed (its transaction rolled back) is claimable by its retry."""
        inbox, message_id = Inbox(), str(uuid.uuid4())
        claimed: list[bool] = []

        async def failing_job() -> None:
            async with UnitOfWork(sessions) as session:
                claimed.append(await inbox.claim(session, message_id, "contract.record"))
                raise RuntimeError("the job failed")

        with pytest.raises(RuntimeError):
            await failing_job()
        assert claimed == [True]

        async with UnitOfWork(sessions) as session:
            assert await inbox.claim(session, message_id, "contract.record") is True


# --- OutboxRelay ---------------------------------------------------------------------------------

ROUTES: Mapping[str, list[str]] = {"contract.Happened": ["contract.on_happened", "audit.on_happened"]}


def queue_of(task_name: str) -> str:
    return f"q-{task_name.split('.', 1)[0]}"


class RecordingSend:
    """A fake broker: records messages; fails for the messages ``fail`` picks."""

    def __init__(self, fail: Callable[[Message[Any]], bool] | None = None) -> None:
        self.sent: list[Message[Any]] = []
        self.fail = fail

    async def __call__(self, message: Message[Any]) -> None:
        await asyncio.sleep(0)
        if self.fail is not None and self.fail(message):
            raise ConnectionError("broker down")
        self.sent.append(message)

    def pairs(self) -> list[tuple[str, str]]:
        return [(m.actor_name, m.kwargs["message_id"]) for m in self.sent]


def _relay(sessions: async_sessionmaker[AsyncSession], send: Any, **kwargs: Any) -> OutboxRelay:
    return OutboxRelay(sessions, send, ROUTES, kwargs.pop("queue_of", queue_of), **kwargs)


class TestRelayOnce:
    async def test_events_fan_out_and_jobs_go_to_their_task(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        event = Happened(subject="fan out")
        token = request_id_var.set("req-relay-0001")
        try:
            await _write(sessions, lambda s: Outbox().publish(s, event),
                         lambda s: Outbox().enqueue(s, "billing.charge", Note(key="job", n=7)))
        finally:
            request_id_var.reset(token)
        job_id = next(str(r.id) for r in await _rows(sessions) if r.kind == JOB)
        send = RecordingSend()

        handled = await _relay(sessions, send).relay_once()

        assert handled == 2
        assert sorted(send.pairs()) == sorted([
            ("contract.on_happened", str(event.event_id)),
            ("audit.on_happened", str(event.event_id)),
            ("billing.charge", job_id),
        ])
        by_actor = {m.actor_name: m for m in send.sent}
        assert {a: m.queue_name for a, m in by_actor.items()} == {
            "contract.on_happened": "q-contract",
            "audit.on_happened": "q-audit",
            "billing.charge": "q-billing",
        }
        for message in send.sent:
            assert message.args == ()
            assert set(message.kwargs) == {"message_id", "request_id", "payload"}
            assert message.kwargs["request_id"] == "req-relay-0001"
        assert Happened.model_validate(by_actor["contract.on_happened"].kwargs["payload"]) == event
        assert by_actor["audit.on_happened"].kwargs["payload"] == event.model_dump(mode="json")
        assert by_actor["billing.charge"].kwargs["payload"] == {"key": "job", "n": 7}

    async def test_sent_rows_are_marked_and_not_sent_again(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await _write(sessions, lambda s: Outbox().publish(s, Happened(subject="once")),
                     lambda s: Outbox().enqueue(s, "contract.record", {"key": "x", "n": 1}))
        send = RecordingSend()
        relay = _relay(sessions, send)
        before = datetime.now(UTC)

        assert await relay.relay_once() == 2
        rows = await _rows(sessions)
        assert all(r.published_at is not None for r in rows)
        assert all(before - timedelta(seconds=1) <= r.published_at <= datetime.now(UTC) + timedelta(seconds=1)
                   for r in rows if r.published_at is not None)
        assert all(r.attempts == 0 and r.last_error is None for r in rows)

        assert await relay.relay_once() == 0
        assert len(send.sent) == 3

    async def test_an_event_nobody_subscribes_to_is_marked_without_sending(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await _write(sessions, lambda s: Outbox().publish(s, Unheard()))
        send = RecordingSend()

        assert await _relay(sessions, send).relay_once() == 1
        assert send.sent == []
        assert [r.published_at is not None for r in await _rows(sessions)] == [True]

    async def test_nothing_to_send(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        send = RecordingSend()
        assert await _relay(sessions, send).relay_once() == 0
        assert send.sent == []

    async def test_rows_of_an_uncommitted_transaction_are_not_sent(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        send = RecordingSend()
        async with sessions() as writer:
            Outbox().publish(writer, Happened(subject="in flight"))
            await writer.flush()
            # The pass may not see the row, or may wait for the writer (a database that locks
            # writers out entirely): either way it must not send an uncommitted row.
            relay_pass = asyncio.create_task(_relay(sessions, send).relay_once())
            await asyncio.wait({relay_pass}, timeout=1)
            await writer.rollback()
        assert await asyncio.wait_for(relay_pass, 10) == 0
        assert send.sent == []
        assert await _rows(sessions) == []

    async def test_a_batch_is_at_most_batch_size_rows(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await _jobs(sessions, 5)
        send = RecordingSend()
        relay = _relay(sessions, send, batch_size=2)

        assert [await relay.relay_once() for _ in range(4)] == [2, 2, 1, 0]
        assert sorted(m.kwargs["payload"]["i"] for m in send.sent) == [0, 1, 2, 3, 4]

    async def test_a_synchronous_send_is_accepted(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        await _write(sessions, lambda s: Outbox().enqueue(s, "contract.record", {"n": 1}))
        sent: list[Message[Any]] = []

        assert await _relay(sessions, sent.append).relay_once() == 1
        assert [m.actor_name for m in sent] == ["contract.record"]


class TestRelayFailure:
    async def test_a_failed_send_keeps_the_row_and_records_the_error(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await _jobs(sessions, 3)
        first, failing, last = (str(r.id) for r in await _rows(sessions))  # the relay's order
        send = RecordingSend(fail=lambda m: m.kwargs["message_id"] == failing)

        with pytest.raises(ConnectionError, match="broker down"):
            await _relay(sessions, send).relay_once()

        assert [m.kwargs["message_id"] for m in send.sent] == [first]
        rows = {str(r.id): r for r in await _rows(sessions)}
        assert rows[first].published_at is not None
        assert (rows[failing].published_at, rows[failing].attempts) == (None, 1)
        assert rows[failing].last_error == "ConnectionError: broker down"
        assert (rows[last].published_at, rows[last].attempts, rows[last].last_error) == (None, 0, None)

    async def test_attempts_count_every_failure(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        await _write(sessions, lambda s: Outbox().enqueue(s, "contract.record", {"n": 1}))
        relay = _relay(sessions, RecordingSend(fail=lambda m: True))
        for _ in range(3):
            with pytest.raises(ConnectionError):
                await relay.relay_once()

        (row,) = await _rows(sessions)
        assert (row.published_at, row.attempts) == (None, 3)

    async def test_a_later_pass_with_a_working_broker_delivers_the_rest(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await _jobs(sessions, 3)
        first, failing, last = (str(r.id) for r in await _rows(sessions))
        failing_send = RecordingSend(fail=lambda m: m.kwargs["message_id"] == failing)
        with pytest.raises(ConnectionError):
            await _relay(sessions, failing_send).relay_once()

        working = RecordingSend()
        assert await _relay(sessions, working).relay_once() == 2

        assert [m.kwargs["message_id"] for m in working.sent] == [failing, last]
        rows = await _rows(sessions)
        assert all(r.published_at is not None for r in rows)
        assert {str(r.id): r.attempts for r in rows} == {first: 0, failing: 1, last: 0}

    async def test_a_fan_out_interrupted_midway_is_sent_again_to_every_subscriber(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        """At least once: the subscriber that already got it gets it again (its inbox dedups)."""
        event = Happened(subject="half")
        await _write(sessions, lambda s: Outbox().publish(s, event))
        flaky = RecordingSend(fail=lambda m: m.actor_name == "audit.on_happened")
        with pytest.raises(ConnectionError):
            await _relay(sessions, flaky).relay_once()
        assert [m.actor_name for m in flaky.sent] == ["contract.on_happened"]

        working = RecordingSend()
        assert await _relay(sessions, working).relay_once() == 1
        assert sorted(m.actor_name for m in working.sent) == ["audit.on_happened", "contract.on_happened"]

    async def test_an_unroutable_row_is_parked_and_does_not_block_later_rows(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        """A job for a task nobody runs (``queue_of`` raises) can never be sent: retrying cannot
        help, so it is parked for inspection instead of stopping every row behind it."""
        await _write(sessions, lambda s: Outbox().enqueue(s, "gone.task", {"n": 0}))
        await asyncio.sleep(0.002)  # the next row's UUIDv7 sorts after this one
        await _write(sessions, lambda s: Outbox().enqueue(s, "contract.record", {"n": 1}))
        queues = {"contract.record": "contract"}
        send = RecordingSend()
        relay = _relay(sessions, send, queue_of=lambda name: queues[name])

        assert await relay.relay_once() == 2
        assert [(m.actor_name, m.queue_name) for m in send.sent] == [("contract.record", "contract")]

        parked, delivered = await _rows(sessions)
        assert parked.name == "gone.task"
        assert (parked.published_at, parked.attempts) == (None, 1)
        assert parked.parked_at is not None
        assert parked.last_error is not None
        assert parked.last_error.startswith("unroutable: KeyError")
        assert delivered.published_at is not None
        assert delivered.parked_at is None

        assert await relay.relay_once() == 0  # a parked row is never picked up again
        (again, _) = await _rows(sessions)
        assert again.attempts == 1
        assert len(send.sent) == 1


@pytest.mark.parametrize("relay_database", ["postgres"], indirect=True)
class TestRelayConcurrency:
    """PostgreSQL only: SQLite has no row locks, so it is for one relay (development) only."""

    async def test_two_relays_never_send_the_same_row(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await _jobs(sessions, 3)
        entered, release = asyncio.Event(), asyncio.Event()
        slow_sent: list[Message[Any]] = []

        async def slow_send(message: Message[Any]) -> None:
            entered.set()
            await release.wait()
            slow_sent.append(message)

        slow = asyncio.create_task(_relay(sessions, slow_send).relay_once())
        try:
            await asyncio.wait_for(entered.wait(), 10)
            other = RecordingSend()
            assert await _relay(sessions, other).relay_once() == 0  # rows locked by the first relay
            assert other.sent == []
        finally:
            release.set()
        assert await asyncio.wait_for(slow, 10) == 3
        assert sorted(m.kwargs["payload"]["i"] for m in slow_sent) == [0, 1, 2]



@pytest.mark.parametrize(
    "relay_database",
    [
        "sqlite",
        "postgres",
    ],
    indirect=True,
)
class TestRelayWithConcurrentWriters:
    async def test_a_commit_elsewhere_during_the_send_does_not_fail_the_pass(
        self, sessions: async_sessionmaker[AsyncSession]
    ) -> None:
        await _jobs(sessions, 2)
        consumers: list[asyncio.Task[None]] = []

        async def consume(message: Message[Any]) -> None:
            async with UnitOfWork(sessions) as worker:  # a worker finishing the job
                await Inbox().claim(worker, message.kwargs["message_id"], message.actor_name)

        async def send(message: Message[Any]) -> None:
            consumers.append(asyncio.create_task(consume(message)))
            # A fast worker commits while the relay is still sending (if the database lets it).
            await asyncio.wait(consumers[-1:], timeout=1)

        try:
            assert await _relay(sessions, send).relay_once() == 2
        finally:
            await asyncio.gather(*consumers)

        rows = await _rows(sessions)
        assert all(r.published_at is not None for r in rows)
        assert all(r.attempts == 0 for r in rows)
        async with sessions() as session:
            assert len((await session.scalars(select(InboxMessage))).all()) == 2
