"""core.messaging.queue.Redeliveries: which deliveries count in ``atrium_jobs_redelivered_total``.

RabbitMQ flags a redelivery itself; on Redis the middleware keeps a started-marker per message
(docs/redelivery.md). The Redis tests use the real server with a namespace of their own and the
broker Atrium builds (``redis_broker``), whose consumers fetch through dramatiq's Lua script.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from prometheus_client import CollectorRegistry

from core.messaging.queue import Redeliveries, redis_broker, stub_broker
from core.observability.metrics import JobMetrics
from tests.support.services import REDIS_URL, require

WELCOME, RECEIPT = "users.send_welcome_email", "billing.send_receipt"
RETRY = {"max_retries": 0, "min_backoff_ms": 100, "max_backoff_ms": 1000, "time_limit_ms": 5000}
METRIC = "atrium_jobs_redelivered_total"


class Counted:
    """A ``Redeliveries`` middleware on metrics of its own, and what it counted per task."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.middleware = Redeliveries(JobMetrics(self.registry))

    def of(self, task: str) -> float:
        return self.registry.get_sample_value(METRIC, {"task": task}) or 0.0

    def tasks(self) -> dict[str, float]:
        """Every task with a sample, and its value."""
        return {s.labels["task"]: s.value for family in self.registry.collect() for s in family.samples
                if s.name == METRIC}


def message(actor: str, queue: str = "users", **options: Any) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=queue, actor_name=actor, args=(), kwargs={}, options=options)


class FlaggedDelivery(MessageProxy):
    """A delivery as dramatiq's RabbitMQ consumer hands it to a worker: a ``MessageProxy`` carrying
    the broker's ``redelivered`` flag (built here: dramatiq's own class for it is private)."""

    def __init__(self, message: dramatiq.Message[Any], redelivered: bool) -> None:
        super().__init__(message)
        self.redelivered = redelivered


def rabbitmq_delivery(redelivered: bool, sent: dramatiq.Message[Any]) -> MessageProxy:
    """``sent`` as dramatiq's RabbitMQ consumer hands it to a worker, with the broker's flag."""
    return FlaggedDelivery(sent, redelivered)


def run(counted: Counted, broker: dramatiq.Broker, delivered: Any, *, skipped: bool = False) -> None:
    """The hooks a dramatiq worker thread calls around one message."""
    counted.middleware.before_process_message(broker, delivered)
    if skipped:
        counted.middleware.after_skip_message(broker, delivered)
    else:
        counted.middleware.after_process_message(broker, delivered, result=None)


# --- RabbitMQ: its own flag --------------------------------------------------------------------


def test_a_delivery_rabbitmq_flags_redelivered_is_counted_under_its_task() -> None:
    counted, broker = Counted(), stub_broker(**RETRY)  # a broker without a Redis client: only the flag
    run(counted, broker, rabbitmq_delivery(False, message(WELCOME)))
    run(counted, broker, rabbitmq_delivery(True, message(WELCOME)))
    run(counted, broker, rabbitmq_delivery(True, message(WELCOME)))
    run(counted, broker, rabbitmq_delivery(True, message(RECEIPT, queue="billing")))
    assert counted.tasks() == {WELCOME: 2.0, RECEIPT: 1.0}


def test_a_first_rabbitmq_delivery_counts_nothing() -> None:
    counted, broker = Counted(), stub_broker(**RETRY)
    for _ in range(3):
        run(counted, broker, rabbitmq_delivery(False, message(WELCOME)))
    assert counted.tasks() == {}


# --- a broker without a client (StubBroker, the development worker) ----------------------------


def test_a_stub_broker_counts_nothing_and_keeps_no_marker() -> None:
    counted, broker = Counted(), stub_broker(**RETRY)
    once = message(WELCOME, redis_message_id=str(uuid.uuid4()))
    run(counted, broker, MessageProxy(once))
    # The same message again, even one whose run never ended: no client, so nothing to compare with.
    counted.middleware.before_process_message(broker, MessageProxy(once))
    counted.middleware.before_process_message(broker, MessageProxy(once))
    assert counted.of(WELCOME) == 0.0
    assert counted.tasks() == {}


def test_a_stub_broker_worker_runs_messages_without_counting_them() -> None:
    """Wired into a real worker, the hooks run for each message and count none."""
    counted, broker = Counted(), stub_broker(**RETRY)
    broker.add_middleware(counted.middleware)
    ran: list[int] = []
    actor = dramatiq.Actor(ran.append, broker=broker, actor_name=WELCOME, queue_name="users", priority=0,
                           options={})
    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=100)
    worker.start()
    try:
        for n in range(3):
            actor.send(n)
        broker.join("users")
        worker.join()
    finally:
        worker.stop()
    assert sorted(ran) == [0, 1, 2]
    assert counted.tasks() == {}


# --- Redis: the started-marker -------------------------------------------------------------------


Brokers = Callable[..., dramatiq.Broker]


@pytest.fixture
def brokers() -> Iterator[Brokers]:
    """Makes Redis brokers (each a worker of its own) on a namespace of the test's own; closes them
    and empties the namespace afterwards."""
    import redis

    require("redis")
    namespace = f"atrium-test-{uuid.uuid4().hex[:10]}"
    made: list[Any] = []

    def make(**options: Any) -> dramatiq.Broker:
        broker = redis_broker(REDIS_URL, namespace, **RETRY, **options)
        broker.declare_queue("users")
        broker.declare_queue("billing")
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.client.close()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{namespace}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def fetched(broker: dramatiq.Broker, queue: str, within: float = 5.0) -> MessageProxy:
    """The next message of ``queue`` as a worker of ``broker`` gets it (it is then in that worker's
    unacknowledged set), fetched through dramatiq's script."""
    consumer = broker.consume(queue, prefetch=1, timeout=100)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = next(consumer)
        if got is not None:
            return got
    raise AssertionError(f"no message on {queue!r} within {within} s")


def marker(broker: dramatiq.Broker, delivered: MessageProxy) -> str:
    return f"{broker.namespace}:__started__.{delivered.options['redis_message_id']}"  # type: ignore[attr-defined]


@pytest.mark.redis
def test_the_marker_is_set_while_a_message_runs_and_deleted_after(brokers: Brokers) -> None:
    counted, broker = Counted(), brokers()
    broker.enqueue(message(WELCOME))
    delivered = fetched(broker, "users")
    key = marker(broker, delivered)
    client: Any = broker.client  # type: ignore[attr-defined]

    counted.middleware.before_process_message(broker, delivered)
    assert client.exists(key) == 1
    assert 0 < client.pttl(key) <= Redeliveries.MARKER_TTL_MS  # a marker never outlives a dead letter
    counted.middleware.after_process_message(broker, delivered, result=None)
    assert client.exists(key) == 0
    assert counted.tasks() == {}  # a first delivery


@pytest.mark.redis
def test_the_marker_is_deleted_after_a_skipped_message(brokers: Brokers) -> None:
    counted, broker = Counted(), brokers()
    broker.enqueue(message(WELCOME))
    delivered = fetched(broker, "users")
    run(counted, broker, delivered, skipped=True)
    assert broker.client.exists(marker(broker, delivered)) == 0  # type: ignore[attr-defined]
    assert counted.tasks() == {}


@pytest.mark.redis
def test_a_message_whose_marker_is_there_counts_once_under_its_task(brokers: Brokers) -> None:
    """A worker started the message and died (the marker stayed); the next delivery counts, and its
    end removes the marker, so a third, ordinary delivery would not count again."""
    counted, broker = Counted(), brokers()
    broker.enqueue(message(WELCOME))
    broker.enqueue(message(RECEIPT, queue="billing"))
    welcome, receipt = fetched(broker, "users"), fetched(broker, "billing")

    counted.middleware.before_process_message(broker, welcome)  # the run that never ended
    run(counted, broker, welcome)  # the redelivery
    assert counted.tasks() == {WELCOME: 1.0}
    assert broker.client.exists(marker(broker, welcome)) == 0  # type: ignore[attr-defined]
    run(counted, broker, welcome)
    run(counted, broker, receipt)
    assert counted.tasks() == {WELCOME: 1.0}


@pytest.mark.redis
def test_a_dead_workers_message_requeued_by_the_broker_counts_as_redelivered(brokers: Brokers) -> None:
    """End to end on the broker: worker A fetches and starts a message, then goes silent (dead);
    once A's heartbeat is older than the timeout, worker B's fetches put the message back, and B's
    delivery of it counts once. A message B gets for the first time does not count."""
    first, second = Counted(), Counted()
    a, b = brokers(heartbeat_timeout=1000), brokers(heartbeat_timeout=1000)
    a.enqueue(message(WELCOME))
    held = fetched(a, "users")
    first.middleware.before_process_message(a, held)  # A runs it... and never sends another command
    fresh = a.enqueue(message(WELCOME))  # a message only B will ever get
    counted: dict[str, float] = {}
    for _ in range(2):  # A's message comes back after A's heartbeat timeout (1 s); B polls meanwhile
        delivered = fetched(b, "users")
        before = second.of(WELCOME)
        run(second, b, delivered)
        counted[delivered.message_id] = second.of(WELCOME) - before
        assert b.client.exists(marker(b, delivered)) == 0  # type: ignore[attr-defined]
    assert counted == {held.message_id: 1.0, fresh.message_id: 0.0}
    assert second.tasks() == {WELCOME: 1.0}
    assert first.tasks() == {}
