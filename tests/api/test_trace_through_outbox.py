"""One trace from a request through the outbox into the jobs it causes (issue 17), as a collector
sees it: a real ``atrium serve`` and a real ``atrium worker`` (production profile, tracing on)
export over OTLP/HTTP to a real receiver (tests/support/otlp_receiver.py), which decodes the
protobuf the exporters send.

    SERVER   POST /api/v1/invoices/{invoice_id}/payments        atrium-api
      PRODUCER billing.charge_payment publish                    (the relay; the row's stored context)
        CONSUMER billing.charge_payment process                  atrium-worker, linked to the PRODUCER
          CLIENT   POST (the payment gateway, httpx)
          PRODUCER billing.PaymentSucceeded publish              (the event the job wrote)
            CONSUMER billing.send_receipt process                atrium-worker, linked to its PRODUCER
              CLIENT   SMTP

Also with the broker down when the payment is accepted: the relay's failed sends are ERROR
PRODUCER spans of the request's trace, and once the broker is back the trace continues from the
outbox; a job attempt that fails and its retry are two CONSUMER spans of that same trace.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api import bearer, sign_up
from tests.support.api_process import cli_runner, serve_process
from tests.support.live_api import LiveApi
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan, render_tree
from tests.support.production import Private, private_production
from tests.support.redis_server import RedisServer, require_redis_server
from tests.support.settings import GENEROUS_RATE_LIMITS
from tests.support.smtp import free_port
from tests.support.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

PAY_ROUTE = "/api/v1/invoices/{invoice_id}/payments"
CHARGE, RECEIPT, SUCCEEDED = "billing.charge_payment", "billing.send_receipt", "billing.PaymentSucceeded"
API, WORKER = "atrium-api", "atrium-worker"


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    # The processes inherit this: their batch processors export every 200 ms instead of every 5 s.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    with OtlpReceiver() as receiver:
        yield receiver


@asynccontextmanager
async def traced_production(
    tmp: Path, pg_database_factory: Callable[[], Awaitable[str]], receiver: OtlpReceiver, *,
    worker: bool = True, **overrides: Any,
) -> AsyncIterator[tuple[Private, LiveApi]]:
    """``atrium serve`` (and, unless told otherwise, ``atrium worker``) exporting to ``receiver``.

    On the way out both are stopped with SIGTERM, which flushes what their exporters still hold.
    """
    async with private_production(tmp, pg_database_factory, **GENEROUS_RATE_LIMITS,
                                  otel_exporter_otlp_endpoint=receiver.url, worker_metrics_port=free_port(),
                                  **overrides) as env:
        if worker:
            await env.start_worker()
        values = {**env.values, "log_level": "WARNING"}
        async with serve_process(values, tmp / "api.log") as client:
            with untraced_client():
                yield env, LiveApi("production", str(client.base_url).rstrip("/"), client, values,
                                   cli_runner(values))
        for process in env.workers:
            if process.poll() is None:
                await env.stop_worker(process)


@contextmanager
def untraced_client() -> Iterator[None]:
    """The test's own HTTP calls send no ``traceparent``: should another test of this process have
    instrumented httpx (tracing configured in-process), its unsampled context would otherwise make
    the API skip these requests' traces."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    with suppress_instrumentation():
        yield


async def a_paid_invoice_to_be(api: LiveApi) -> tuple[dict[str, str], str, str]:
    """An item (made by an admin), a customer and an invoice of theirs: (headers, email, invoice id)."""
    admin = bearer(await api.admin_token())
    body = {"name": f"Item {uuid.uuid4().hex[:8]}", "price": 1250, "currency": "EUR"}
    item = await api.client.post("/api/v1/items", headers=admin, json=body)
    assert item.status_code == 201, item.text
    user, token = await sign_up(api.client, full_name="Tracy Trace")
    headers = bearer(token)
    invoice = await api.client.post("/api/v1/invoices", headers=headers,
                                    json={"lines": [{"item_id": item.json()["id"], "quantity": 2}]})
    assert invoice.status_code == 201, invoice.text
    return headers, str(user["email"]), str(invoice.json()["id"])


async def pay(api: LiveApi, headers: dict[str, str], invoice_id: str) -> str:
    accepted = await api.client.post(f"/api/v1/invoices/{invoice_id}/payments",
                                     json={"payment_token": "tok_visa"},
                                     headers={**headers, "Idempotency-Key": uuid.uuid4().hex})
    assert accepted.status_code == 202, accepted.text
    return str(accepted.json()["id"])


async def paid_and_receipted(env: Private, api: LiveApi, headers: dict[str, str], email: str,
                             invoice_id: str, payment_id: str) -> None:
    async def succeeded() -> bool:
        response = await api.client.get(f"/api/v1/payments/{payment_id}", headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["status"] != "failed", response.json()
        return bool(response.json()["status"] == "succeeded")

    await eventually(succeeded, within=30)
    invoice = await api.client.get(f"/api/v1/invoices/{invoice_id}", headers=headers)
    assert invoice.json()["status"] == "paid"
    await env.smtp.wait_for(email, timeout=15)


async def worker_counters(env: Private) -> dict[str, float]:
    """The worker's per-module event counters, as its /metrics page shows them."""
    return await counters_at(f"http://127.0.0.1:{env.values['worker_metrics_port']}/metrics")


async def counters_at(url: str) -> dict[str, float]:
    """The per-module event counters on the /metrics page at ``url``."""
    async with httpx.AsyncClient() as client:
        page = (await client.get(url)).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
            if line.startswith(("atrium_events_published_total", "atrium_events_consumed_total"))}


async def _has(counters: Awaitable[dict[str, float]], name: str) -> bool:
    return name in await counters


# --- reading the trace ---------------------------------------------------------------------------


class Trace:
    """The spans of the payment request's trace, with the questions the assertions ask."""

    def __init__(self, spans: list[ReceivedSpan]) -> None:
        self.spans = spans
        self.by_id = {s.span_id: s for s in spans}

    def __str__(self) -> str:
        return render_tree(self.spans)

    def named(self, name: str, kind: str) -> list[ReceivedSpan]:
        return sorted((s for s in self.spans if s.name == name and s.kind == kind), key=lambda s: s.start_ns)

    def one(self, name: str, kind: str) -> ReceivedSpan:
        found = self.named(name, kind)
        assert len(found) == 1, f"{len(found)} {kind} spans named {name!r} in\n{self}"
        return found[0]

    def under(self, ancestor: ReceivedSpan) -> list[ReceivedSpan]:
        """Every span below ``ancestor``."""
        return [s for s in self.spans if ancestor.span_id in self.ancestors(s)]

    def ancestors(self, span: ReceivedSpan) -> list[str]:
        chain, parent = [], span.parent_span_id
        while parent is not None and parent in self.by_id and parent not in chain:
            chain.append(parent)
            parent = self.by_id[parent].parent_span_id
        return chain

    def orphans(self) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.parent_span_id is not None and s.parent_span_id not in self.by_id]

    def roots(self) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.parent_span_id is None]


def payment_server_span(receiver: OtlpReceiver) -> ReceivedSpan | None:
    found = receiver.find(lambda s: s.kind == "SERVER" and s.attributes.get("http.route") == PAY_ROUTE
                          and s.attributes.get("http.request.method") == "POST")
    assert len(found) <= 1, found
    return found[0] if found else None


async def the_trace(receiver: OtlpReceiver, complete: Callable[[Trace], bool], within: float = 20) -> Trace:
    """The payment request's trace, once ``complete`` says every span has arrived."""
    async def arrived() -> bool:
        server = payment_server_span(receiver)
        return server is not None and complete(Trace(receiver.trace(server.trace_id)))

    try:
        await eventually(arrived, within=within)
    except AssertionError:
        server = payment_server_span(receiver)
        got = render_tree(receiver.trace(server.trace_id)) if server else "no SERVER span of the payment"
        raise AssertionError(f"the trace never completed; it has:\n{got}") from None
    server = payment_server_span(receiver)
    assert server is not None
    return Trace(receiver.trace(server.trace_id))


def has_receipt_mail_span(t: Trace) -> bool:
    return any(smtp_spans(t, c) for c in t.named(f"{RECEIPT} process", "CONSUMER"))


def smtp_spans(t: Trace, consumer: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in t.under(consumer) if s.kind == "CLIENT" and "smtp" in s.name.lower()]


def gateway_calls(t: Trace, consumer: ReceivedSpan, gateway_port: int) -> list[ReceivedSpan]:
    """The httpx CLIENT spans of the gateway's /v1/charges below ``consumer``."""
    return [s for s in t.under(consumer) if s.kind == "CLIENT"
            and "/v1/charges" in str(s.attributes.get("url.full", s.attributes.get("http.url", "")))
            and s.attributes.get("server.port", gateway_port) == gateway_port]


def assert_delivered(t: Trace, producer: ReceivedSpan, consumer: ReceivedSpan) -> None:
    """The job's span is the child of the relay's PRODUCER span and links to it."""
    assert consumer.parent_span_id == producer.span_id, t
    assert (producer.trace_id, producer.span_id) in consumer.links, t
    for key in ("messaging.destination.name", "messaging.message.id", "atrium.outbox.message_id"):
        assert consumer.attributes[key] == producer.attributes[key], key
    assert consumer.attributes["messaging.system"] == producer.attributes["messaging.system"] == "dramatiq"
    assert consumer.service == WORKER
    assert producer.service in (API, WORKER)  # whichever process's relay sent it


def assert_whole(t: Trace) -> None:
    """One root (the request), no span whose parent is missing, every span in a module."""
    assert not t.orphans(), f"orphans {[s.name for s in t.orphans()]} in\n{t}"
    assert [(s.kind, s.name) for s in t.roots()] == [("SERVER", f"POST {PAY_ROUTE}")], t
    assert all(s.module for s in t.spans), [s.name for s in t.spans if not s.module]


# --- the tests -----------------------------------------------------------------------------------


async def test_one_trace_from_the_payment_request_through_the_outbox_to_the_receipt_mail(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]], receiver: OtlpReceiver
) -> None:
    async with traced_production(tmp_path, pg_database_factory, receiver) as (env, api):
        headers, email, invoice_id = await a_paid_invoice_to_be(api)
        payment_id = await pay(api, headers, invoice_id)
        await paid_and_receipted(env, api, headers, email, invoice_id, payment_id)
        consumed = f'atrium_events_consumed_total{{module="billing",task="{RECEIPT}"}}'
        # Counted once the job has committed, a moment after the mail left.
        await eventually(lambda: _has(worker_counters(env), consumed))
        counters = await worker_counters(env)
        api_counters = await counters_at(f"{api.base_url}/metrics")
        t = await the_trace(receiver, has_receipt_mail_span)
    print(f"\n{t}")

    # The event was published once, by whichever relay took its row first (the worker's and the
    # API's both poll the outbox), and consumed in the worker. (The users' welcome mails are counted
    # too, under their module.)
    published = f'atrium_events_published_total{{event="{SUCCEEDED}",module="billing"}}'
    assert counters.get(published, 0) + api_counters.get(published, 0) == 1, (counters, api_counters)
    assert counters[consumed] == 1, counters
    assert_whole(t)
    server = t.roots()[0]
    assert (server.service, server.module) == (API, "billing")
    charge_sent = t.one(f"{CHARGE} publish", "PRODUCER")
    assert charge_sent.parent_span_id == server.span_id, t  # written in the request's transaction
    assert charge_sent.status != "ERROR"
    assert charge_sent.attributes["atrium.outbox.kind"] == "job"
    charge = t.one(f"{CHARGE} process", "CONSUMER")
    assert_delivered(t, charge_sent, charge)
    assert (charge.status, charge.attributes["atrium.job.attempt"]) == ("UNSET", 1)
    [gateway] = gateway_calls(t, charge, env.gateway.port)
    assert gateway.service == WORKER

    event_sent = t.one(f"{SUCCEEDED} publish", "PRODUCER")
    assert event_sent.parent_span_id == charge.span_id, t  # written in the job's transaction
    assert event_sent.attributes["atrium.outbox.kind"] == "event"
    receipt = t.one(f"{RECEIPT} process", "CONSUMER")
    assert_delivered(t, event_sent, receipt)
    [mail] = smtp_spans(t, receipt)
    assert mail.service == WORKER

    for span in (server, charge_sent, charge, gateway, event_sent, receipt, mail):
        assert span.module == "billing", f"{span.name}: atrium.module={span.module}"
    assert all(s.status != "ERROR" for s in t.spans), t
    assert {s.service for s in t.spans} == {API, WORKER}
    # The request id travels the same way: every span of the jobs names the request that caused them.
    request_ids = {s.attributes["atrium.request_id"] for s in (charge_sent, charge, event_sent, receipt)}
    assert len(request_ids) == 1, request_ids
    assert request_ids != {"-"}


async def test_the_trace_survives_a_broker_outage_and_each_job_attempt_is_a_span_of_it(
    tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]], receiver: OtlpReceiver
) -> None:
    require_redis_server("the private broker")
    with RedisServer() as broker:
        async with traced_production(tmp_path, pg_database_factory, receiver, worker=False,
                                     broker_url=broker.url) as (env, api):
            headers, email, invoice_id = await a_paid_invoice_to_be(api)

            broker.stop()
            payment_id = await pay(api, headers, invoice_id)  # accepted: the job waits in the outbox

            def send_failed(t: Trace) -> bool:
                return any(s.status == "ERROR" for s in t.named(f"{CHARGE} publish", "PRODUCER"))

            await the_trace(receiver, send_failed)  # the API's relay tried, and failed
            await asyncio.sleep(0.5)

            broker.start()  # the same port, empty
            # The first attempt's three gateway calls fail (503): the job fails and is retried.
            env.gateway.fail_next(int(api.values.get("payments_max_attempts", 3)))
            await env.start_worker()
            await paid_and_receipted(env, api, headers, email, invoice_id, payment_id)
            t = await the_trace(receiver, has_receipt_mail_span)
    print(f"\n{t}")

    assert_whole(t)
    server = t.roots()[0]
    sends = t.named(f"{CHARGE} publish", "PRODUCER")
    failed, [delivered] = sends[:-1], sends[-1:]
    assert failed, t
    assert all(s.status == "ERROR" and "exception" in s.events for s in failed), t
    assert delivered.status != "ERROR", t
    # Each send, failed or not, continues from the context stored in the row: the request's span.
    assert all(s.parent_span_id == server.span_id for s in sends), t
    assert [s.attributes["atrium.outbox.attempt"] for s in sends] == list(range(1, len(sends) + 1))

    first, retry = t.named(f"{CHARGE} process", "CONSUMER")
    for attempt in (first, retry):
        assert_delivered(t, delivered, attempt)
    assert first.span_id != retry.span_id
    assert (first.status, first.attributes["atrium.job.attempt"]) == ("ERROR", 1), t
    assert "exception" in first.events
    assert (retry.status, retry.attributes["atrium.job.attempt"]) == ("UNSET", 2), t
    assert len(gateway_calls(t, first, env.gateway.port)) == 3
    assert len(gateway_calls(t, retry, env.gateway.port)) == 1

    receipt = t.one(f"{RECEIPT} process", "CONSUMER")
    assert_delivered(t, t.one(f"{SUCCEEDED} publish", "PRODUCER"), receipt)
    assert retry.span_id in t.ancestors(receipt)  # the event came from the attempt that succeeded
    assert smtp_spans(t, receipt)
