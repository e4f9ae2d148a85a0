"""One contract for every ``PaymentGateway``: a key is charged at most once, declines are results,
refusals are permanent, outages are transient, and only correctly signed, fresh webhooks are believed.

The in-memory ``FakePaymentGateway`` is checked against its own ledger; ``HttpPaymentGateway``
against a real local gateway server (``tests.support.gateway``) over TCP, whose ledger applies the
same rules. The HTTP adapter's own duties (retrying with the same key, timeouts, Retry-After, one
client per event loop, the status mapping) follow in http-only classes.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from loguru import logger

from modules.billing.adapters.gateway import (
    SIGNATURE_HEADER,
    SIGNATURE_TOLERANCE_SECONDS,
    ChargeRequest,
    ChargeResult,
    FakePaymentGateway,
    GatewayEvent,
    GatewayLedger,
    GatewayRejected,
    GatewayUnavailable,
    InvalidWebhook,
    PaymentGateway,
    encode_event,
    sign_webhook,
)
from modules.billing.adapters.http import HttpPaymentGateway
from tests.support.gateway import Delivery, GatewayServer
from tests.support.smtp import free_port

DECLINES = [
    ("tok_chargeDeclined", "card_declined"),
    ("tok_insufficientFunds", "insufficient_funds"),
    ("tok_expiredCard", "expired_card"),
]


@dataclass
class Gateway:
    """An adapter under test, the ledger behind it, and the gateway-side levers."""

    adapter: PaymentGateway
    ledger: GatewayLedger
    secret: str
    settle: Callable[[], list[Delivery]]  # settle pending charges into signed webhook deliveries
    outage: Callable[[], None]  # the next ``charge`` call fails as a whole (transiently)
    lookup_outage: Callable[[], None]  # the next ``find_charge`` call fails as a whole (transiently)


@pytest.fixture(scope="module")
def gateway_server() -> Iterator[GatewayServer]:
    with GatewayServer() as server:
        yield server


@pytest.fixture
def server(gateway_server: GatewayServer) -> Iterator[GatewayServer]:
    yield gateway_server
    gateway_server.clear_faults()  # a failed test must not leave injected faults for the next one


def http_adapter(server: GatewayServer, **options: Any) -> HttpPaymentGateway:
    settings: dict[str, Any] = {"backoff": 0.01, "max_backoff": 0.05, "timeout": 2.0, "connect_timeout": 1.0}
    settings.update(options)
    api_key = settings.pop("api_key", server.api_key)
    return HttpPaymentGateway(server.url, api_key, server.webhook_secret, **settings)


@pytest.fixture(params=["memory", "http"])
async def gateway(request: pytest.FixtureRequest) -> AsyncIterator[Gateway]:
    if request.param == "memory":
        fake = FakePaymentGateway("whsec_" + uuid.uuid4().hex)

        def settle_memory() -> list[Delivery]:
            return [(event, *fake.signed(event)) for event in fake.ledger.settle_pending()]

        yield Gateway(fake, fake.ledger, fake.webhook_secret, settle_memory, lambda: fake.fail_next(1),
                      lambda: fake.fail_next(1, lookups=True))
        return
    server: GatewayServer = request.getfixturevalue("server")
    adapter = http_adapter(server)
    yield Gateway(adapter, server.ledger, server.webhook_secret, server.settle_pending,
                  lambda: server.fail_next(adapter.max_attempts),
                  lambda: server.fail_next(adapter.max_attempts, lookups=True))
    await adapter.aclose()


@pytest.fixture
def warnings_logged() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda message: records.append(message.record), level="WARNING")
    yield records
    logger.remove(sink)


def new_key() -> str:
    return f"pay_{uuid.uuid4().hex}"


def charge_request(
    key: str, token: str = "tok_visa", amount: int = 1500, currency: str = "EUR"
) -> ChargeRequest:
    return ChargeRequest(key, amount, currency, token, description="Order 42", metadata={"order": "42"})


def delivery_for(deliveries: list[Delivery], key: str) -> Delivery:
    matching = [d for d in deliveries if d[0].idempotency_key == key]
    assert len(matching) == 1, f"expected one webhook for {key}, got {len(matching)}"
    return matching[0]


# --- the contract, for every adapter ------------------------------------------------------------


class TestCharge:
    async def test_a_card_token_is_charged_once(self, gateway: Gateway) -> None:
        key = new_key()
        result = await gateway.adapter.charge(charge_request(key))
        assert result.status == "succeeded"
        assert (result.charge_id or "").startswith("ch_")
        assert [c.id for c in gateway.ledger.successful_charges(key)] == [result.charge_id]

    async def test_the_same_key_returns_the_first_charge_instead_of_charging_again(
        self, gateway: Gateway
    ) -> None:
        key = new_key()
        first = await gateway.adapter.charge(charge_request(key))
        again = await gateway.adapter.charge(charge_request(key))
        assert again == first
        assert len(gateway.ledger.successful_charges(key)) == 1
        assert gateway.ledger.requests.count(key) == 2

    async def test_concurrent_calls_with_one_key_make_one_charge(self, gateway: Gateway) -> None:
        key = new_key()
        results = await asyncio.gather(*(gateway.adapter.charge(charge_request(key)) for _ in range(5)))
        assert {r.charge_id for r in results} == {results[0].charge_id}
        assert [c.id for c in gateway.ledger.successful_charges(key)] == [results[0].charge_id]

    @pytest.mark.parametrize(
        "changed",
        [{"amount": 999}, {"currency": "USD"}, {"token": "tok_mastercard"}],
        ids=lambda changed: next(iter(changed)),
    )
    async def test_a_key_reused_with_other_parameters_is_rejected(
        self, gateway: Gateway, changed: dict[str, Any]
    ) -> None:
        key = new_key()
        first = await gateway.adapter.charge(charge_request(key))
        with pytest.raises(GatewayRejected) as caught:
            await gateway.adapter.charge(charge_request(key, **changed))
        assert caught.value.code == "idempotency_key_reused"
        assert [c.id for c in gateway.ledger.successful_charges(key)] == [first.charge_id]

    @pytest.mark.parametrize(("token", "code"), DECLINES)
    async def test_a_declined_card_is_a_result_not_an_error(
        self, gateway: Gateway, token: str, code: str
    ) -> None:
        key = new_key()
        result = await gateway.adapter.charge(charge_request(key, token))
        assert result.status == "declined"
        assert result.failure_code == code
        assert result.failure_message
        assert (result.charge_id or "").startswith("ch_")
        assert gateway.ledger.successful_charges(key) == []
        assert await gateway.adapter.charge(charge_request(key, token)) == result  # replays too

    @pytest.mark.parametrize(
        ("token", "amount", "code"),
        [
            ("card_4242", 1500, "invalid_token"),
            ("tok_visa", 0, "invalid_amount"),
            ("tok_visa", -5, "invalid_amount"),
        ],
    )
    async def test_an_invalid_request_is_rejected_permanently(
        self, gateway: Gateway, token: str, amount: int, code: str
    ) -> None:
        key = new_key()
        with pytest.raises(GatewayRejected) as caught:
            await gateway.adapter.charge(charge_request(key, token, amount))
        assert caught.value.code == code
        assert key not in gateway.ledger.charges

    async def test_an_outage_is_transient_and_charges_nothing(self, gateway: Gateway) -> None:
        key = new_key()
        gateway.outage()
        with pytest.raises(GatewayUnavailable):
            await gateway.adapter.charge(charge_request(key))
        assert key not in gateway.ledger.charges
        later = await gateway.adapter.charge(charge_request(key))  # the caller's retry, same key
        assert later.status == "succeeded"
        assert [c.id for c in gateway.ledger.successful_charges(key)] == [later.charge_id]


class TestFindCharge:
    """The reconciler's question: what became of this key? Asked, never charged."""

    async def test_a_key_never_charged_is_unknown_and_stays_uncharged(self, gateway: Gateway) -> None:
        key = new_key()
        assert await gateway.adapter.find_charge(key) is None
        assert key not in gateway.ledger.charges
        assert key not in gateway.ledger.requests  # a look-up is no charge attempt

    async def test_a_charged_key_answers_the_charge(self, gateway: Gateway) -> None:
        key = new_key()
        charged = await gateway.adapter.charge(charge_request(key))
        assert await gateway.adapter.find_charge(key) == charged
        assert gateway.ledger.requests.count(key) == 1
        assert [c.id for c in gateway.ledger.successful_charges(key)] == [charged.charge_id]

    @pytest.mark.parametrize(("token", "code"), DECLINES)
    async def test_a_declined_key_answers_the_decline(self, gateway: Gateway, token: str, code: str) -> None:
        key = new_key()
        declined = await gateway.adapter.charge(charge_request(key, token))
        found = await gateway.adapter.find_charge(key)
        assert found == declined
        assert found is not None
        assert (found.status, found.failure_code) == ("declined", code)

    async def test_an_async_charge_is_pending_until_it_settles(self, gateway: Gateway) -> None:
        key = new_key()
        pending = await gateway.adapter.charge(charge_request(key, "tok_async"))
        assert await gateway.adapter.find_charge(key) == pending
        delivery_for(gateway.settle(), key)
        assert await gateway.adapter.find_charge(key) == ChargeResult("succeeded", pending.charge_id)

    async def test_a_refused_charge_leaves_the_key_unknown(self, gateway: Gateway) -> None:
        key = new_key()
        with pytest.raises(GatewayRejected):
            await gateway.adapter.charge(charge_request(key, "card_4242"))
        assert await gateway.adapter.find_charge(key) is None

    async def test_an_outage_is_transient(self, gateway: Gateway) -> None:
        key = new_key()
        charged = await gateway.adapter.charge(charge_request(key))
        gateway.lookup_outage()
        with pytest.raises(GatewayUnavailable):
            await gateway.adapter.find_charge(key)
        assert await gateway.adapter.find_charge(key) == charged
        assert len(gateway.ledger.successful_charges(key)) == 1


class TestWebhooks:
    async def test_an_async_charge_is_pending_then_settles_by_a_verified_webhook(
        self, gateway: Gateway
    ) -> None:
        key = new_key()
        pending = await gateway.adapter.charge(charge_request(key, "tok_async"))
        assert pending.status == "pending"
        assert pending.charge_id is not None
        _, body, headers = delivery_for(gateway.settle(), key)
        event = gateway.adapter.parse_webhook(body, headers)
        assert isinstance(event, GatewayEvent)
        assert (event.type, event.status, event.idempotency_key, event.charge_id) == (
            "charge.succeeded", "succeeded", key, pending.charge_id
        )
        assert [c.id for c in gateway.ledger.successful_charges(key)] == [pending.charge_id]
        assert await gateway.adapter.charge(charge_request(key, "tok_async")) == ChargeResult(
            "succeeded", pending.charge_id
        )

    async def test_an_async_decline_settles_to_declined(self, gateway: Gateway) -> None:
        key = new_key()
        pending = await gateway.adapter.charge(charge_request(key, "tok_asyncDeclined"))
        assert pending.status == "pending"
        _, body, headers = delivery_for(gateway.settle(), key)
        event = gateway.adapter.parse_webhook(body, headers)
        assert (event.type, event.status) == ("charge.failed", "declined")
        assert (event.failure_code, event.charge_id) == ("card_declined", pending.charge_id)
        assert gateway.ledger.successful_charges(key) == []
        assert [d for d in gateway.settle() if d[0].idempotency_key == key] == []  # settles only once

    async def test_the_signature_header_name_is_case_insensitive(self, gateway: Gateway) -> None:
        body, header = _signed_event(gateway.secret)
        event = gateway.adapter.parse_webhook(body, {SIGNATURE_HEADER.lower(): header})
        assert event.id == "evt_test"

    @pytest.mark.parametrize(
        "forgery",
        ["tampered-body", "wrong-secret", "missing-header", "too-old", "malformed", "bad-timestamp", "no-v1"],
    )
    async def test_a_forged_or_stale_webhook_is_refused(self, gateway: Gateway, forgery: str) -> None:
        body, header = _signed_event(gateway.secret)
        gateway.adapter.parse_webhook(body, {SIGNATURE_HEADER: header})  # the original is fine
        old = int(time.time()) - SIGNATURE_TOLERANCE_SECONDS - 60
        forged: tuple[bytes, str | None] = {
            "tampered-body": (body.replace(b"succeeded", b"declined"), header),
            "wrong-secret": (body, sign_webhook("whsec_other", body)),
            "missing-header": (body, None),
            "too-old": (body, sign_webhook(gateway.secret, body, timestamp=old)),
            "malformed": (body, "garbage"),
            "bad-timestamp": (body, "t=soon," + header.split(",")[1]),
            "no-v1": (body, header.split(",")[0]),
        }[forgery]
        forged_body, forged_header = forged
        headers = {} if forged_header is None else {SIGNATURE_HEADER: forged_header}
        with pytest.raises(InvalidWebhook):
            gateway.adapter.parse_webhook(forged_body, headers)

    async def test_a_signed_but_malformed_body_is_refused(self, gateway: Gateway) -> None:
        body = b'{"id": "evt_x", "type": "charge.refunded", "data": {}}'
        with pytest.raises(InvalidWebhook):
            gateway.adapter.parse_webhook(body, {SIGNATURE_HEADER: sign_webhook(gateway.secret, body)})


def _signed_event(secret: str) -> tuple[bytes, str]:
    body = encode_event(GatewayEvent("evt_test", "charge.succeeded", "ch_test", "pay_test", "succeeded"))
    return body, sign_webhook(secret, body)


# --- the HTTP adapter against the real local server ---------------------------------------------


class TestHttpRetries:
    async def test_transient_failures_are_retried_with_the_same_key(self, server: GatewayServer) -> None:
        key, adapter = new_key(), http_adapter(server, max_attempts=3)
        server.fail_next(2, status=503)
        result = await adapter.charge(charge_request(key))
        await adapter.aclose()
        assert result.status == "succeeded"
        assert [r for r in server.requests if r[0] == key] == [(key, 503), (key, 503), (key, 200)]
        assert [c.id for c in server.ledger.successful_charges(key)] == [result.charge_id]

    async def test_gives_up_after_max_attempts_without_charging(self, server: GatewayServer) -> None:
        key, adapter = new_key(), http_adapter(server, max_attempts=3)
        server.fail_next(5)
        with pytest.raises(GatewayUnavailable, match=r"after 3 attempt.*HTTP 503"):
            await adapter.charge(charge_request(key))
        await adapter.aclose()
        assert [r for r in server.requests if r[0] == key] == [(key, 503)] * 3
        assert key not in server.ledger.charges

    @pytest.mark.parametrize(
        ("status", "retry_after", "options", "expected_delay"),
        [(429, 0, {"backoff": 1.0, "max_backoff": 2.0}, 0.0), (503, 30, {"max_backoff": 0.05}, 0.05)],
        ids=["retry-after-0", "capped-by-max-backoff"],
    )
    async def test_retry_after_is_honoured_up_to_max_backoff(
        self, server: GatewayServer, warnings_logged: list[dict[str, Any]],
        status: int, retry_after: float, options: dict[str, float], expected_delay: float,
    ) -> None:
        key, adapter = new_key(), http_adapter(server, **options)
        server.fail_next(1, status=status, retry_after=retry_after)
        result = await adapter.charge(charge_request(key))
        await adapter.aclose()
        assert result.status == "succeeded"
        assert [r for r in server.requests if r[0] == key] == [(key, status), (key, 200)]
        retries = [r["extra"] for r in warnings_logged if r["extra"].get("key") == key]
        assert [(r["attempt"], r["delay"]) for r in retries] == [(1, expected_delay)]

    async def test_a_wrong_api_key_is_unavailable_and_never_leaks(
        self, server: GatewayServer, warnings_logged: list[dict[str, Any]]
    ) -> None:
        key, api_key, token = new_key(), "sk_wrong_" + uuid.uuid4().hex, "tok_" + uuid.uuid4().hex
        adapter = http_adapter(server, api_key=api_key)
        with pytest.raises(GatewayUnavailable) as caught:
            await adapter.charge(charge_request(key, token))
        await adapter.aclose()
        assert "401" in str(caught.value)
        assert [r for r in server.requests if r[0] == key] == [(key, 401)] * 3
        assert key not in server.ledger.charges
        logged = [r["message"] for r in warnings_logged if r["extra"].get("key") == key]
        assert len(logged) == 2
        for text in [str(caught.value), repr(adapter), *logged]:
            assert api_key not in text
            assert token not in text

    async def test_a_read_timeout_on_a_charge_that_happened_is_recovered_with_the_same_key(
        self, server: GatewayServer, warnings_logged: list[dict[str, Any]]
    ) -> None:
        key, adapter = new_key(), http_adapter(server, timeout=0.3)
        server.delay_next(1.0)  # the gateway charges, then answers after the client gave up
        result = await adapter.charge(charge_request(key))
        await adapter.aclose()
        assert result.status == "succeeded"
        assert [c.id for c in server.ledger.successful_charges(key)] == [result.charge_id]
        assert server.ledger.requests.count(key) == 2
        assert [r["extra"]["reason"] for r in warnings_logged if r["extra"].get("key") == key] == [
            "timeout (ReadTimeout)"
        ]

    async def test_a_server_that_is_down_is_unavailable_quickly(self) -> None:
        adapter = HttpPaymentGateway(f"http://127.0.0.1:{free_port()}", "sk", "whsec", backoff=0.01,
                                     max_backoff=0.05, connect_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(GatewayUnavailable, match="ConnectError"):
            await adapter.charge(charge_request(new_key()))
        await adapter.aclose()
        assert time.monotonic() - started < 2.0  # refused connections are not waited out

    async def test_a_key_in_flight_answers_409_and_is_retried_until_the_first_request_ends(
        self, server: GatewayServer
    ) -> None:
        key, adapter = new_key(), http_adapter(server)
        held = server.hold_after_charge()
        first = asyncio.create_task(adapter.charge(charge_request(key)))
        assert await asyncio.to_thread(held.charged.wait, 5.0)
        assert not first.done()
        impatient = http_adapter(server, max_attempts=1)
        with pytest.raises(GatewayUnavailable, match="409 idempotency_key_in_use"):
            await impatient.charge(charge_request(key))
        patient = http_adapter(server, max_attempts=100)
        second = asyncio.create_task(patient.charge(charge_request(key)))
        await _until(lambda: server.requests.count((key, 409)) >= 2)  # the patient one was turned away too
        held.release()
        results = await asyncio.gather(first, second)
        for client in (adapter, impatient, patient):
            await client.aclose()
        assert results[0].status == "succeeded"
        assert results[1] == results[0]
        assert [c.id for c in server.ledger.successful_charges(key)] == [results[0].charge_id]

    async def test_a_held_charge_whose_client_went_away_is_found_by_the_retry(
        self, server: GatewayServer
    ) -> None:
        key = new_key()
        held = server.hold_after_charge()
        gone = http_adapter(server, timeout=0.2, max_attempts=1)
        with pytest.raises(GatewayUnavailable, match="ReadTimeout"):
            await gone.charge(charge_request(key))
        await gone.aclose()
        assert held.charged.is_set()
        held.release()
        await _until(lambda: (key, 200) in server.requests)  # the held request finished anyway
        retry = http_adapter(server)
        result = await retry.charge(charge_request(key))
        await retry.aclose()
        assert [c.id for c in server.ledger.successful_charges(key)] == [result.charge_id]

    async def test_one_adapter_serves_two_event_loops(self, server: GatewayServer) -> None:
        adapter = http_adapter(server)
        here = await adapter.charge(charge_request(new_key()))  # leaves a pooled connection on this loop

        async def on_another_loop() -> ChargeResult:
            try:
                return await adapter.charge(charge_request(new_key()))
            finally:
                await adapter.aclose()  # closes this loop's client and, on its own loop, ours

        there = await asyncio.to_thread(asyncio.run, on_another_loop())
        again = await adapter.charge(charge_request(new_key()))  # a fresh client after aclose
        await adapter.aclose()
        assert [here.status, there.status, again.status] == ["succeeded"] * 3
        assert len({here.charge_id, there.charge_id, again.charge_id}) == 3

    async def test_auto_settled_webhooks_are_posted_to_the_webhook_url(self) -> None:
        with _WebhookReceiver() as receiver, GatewayServer(receiver.url, auto_settle_after=0.05) as gw:
            key, adapter = new_key(), http_adapter(gw)
            pending = await adapter.charge(charge_request(key, "tok_async"))
            await adapter.aclose()
            await _until(lambda: len(gw.webhook_deliveries) == 1)
            body, headers = receiver.received[0]
            event = adapter.parse_webhook(body, headers)
            assert (event.idempotency_key, event.charge_id) == (key, pending.charge_id)
            assert event.status == "succeeded"
            assert gw.webhook_deliveries == [(event, 204)]


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class _WebhookReceiver:
    """A bare HTTP endpoint on a thread that keeps every POST (body, headers) and answers 204."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((body, dict(self.headers.items())))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/webhooks/payments"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> _WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# --- the HTTP adapter's status mapping, against a scripted transport ---------------------------


def _scripted(*answers: httpx.Response | Exception) -> tuple[HttpPaymentGateway, list[httpx.Request]]:
    """An adapter whose gateway gives ``answers`` in turn, then succeeds; plus the requests it saw."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[len(seen) - 1] if len(seen) <= len(answers) else _ok()
        if isinstance(answer, Exception):
            raise answer
        return answer

    adapter = HttpPaymentGateway("https://gateway.test", "sk_live_x", "whsec", max_attempts=2, backoff=0.001,
                                 max_backoff=0.001, transport=httpx.MockTransport(handle))
    return adapter, seen


def _ok(status: int = 200, charge_status: str = "succeeded") -> httpx.Response:
    body = {"id": "ch_1", "status": charge_status, "amount": 1500, "currency": "EUR"}
    return httpx.Response(status, json=body)


def _failure(status: int, code: str, **extra: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": f"{code}!", **extra}})


class TestHttpProtocol:
    async def test_sends_the_documented_request(self) -> None:
        adapter, seen = _scripted()
        assert await adapter.charge(charge_request("pay_1")) == ChargeResult("succeeded", "ch_1")
        (request,) = seen
        assert (request.method, str(request.url)) == ("POST", "https://gateway.test/v1/charges")
        assert request.headers["Authorization"] == "Bearer sk_live_x"
        assert request.headers["Idempotency-Key"] == "pay_1"
        assert json.loads(request.content) == {
            "amount": 1500, "currency": "EUR", "source": "tok_visa", "description": "Order 42",
            "metadata": {"order": "42"},
        }

    async def test_looks_a_charge_up_by_key(self) -> None:
        adapter, seen = _scripted(_ok(200, "pending"), _failure(404, "charge_not_found"))
        assert await adapter.find_charge("pay 1/&") == ChargeResult("pending", "ch_1")
        assert await adapter.find_charge("pay_2") is None
        assert [(r.method, r.url.path, r.url.params["idempotency_key"]) for r in seen] == [
            ("GET", "/v1/charges", "pay 1/&"), ("GET", "/v1/charges", "pay_2"),
        ]
        assert seen[0].headers["Authorization"] == "Bearer sk_live_x"

    async def test_a_declined_charge_is_looked_up_with_its_reason(self) -> None:
        body = {"id": "ch_9", "status": "declined", "amount": 1500, "currency": "EUR",
                "failure_code": "expired_card", "failure_message": "The card has expired."}
        adapter, _ = _scripted(httpx.Response(200, json=body))
        assert await adapter.find_charge("pay_1") == ChargeResult(
            "declined", "ch_9", "expired_card", "The card has expired."
        )

    @pytest.mark.parametrize(
        "answer",
        [_failure(503, "down"), _failure(429, "rate_limited"), httpx.Response(200, json={"id": "ch_1"}),
         httpx.ReadTimeout("slow")],
        ids=["503", "429", "200-no-status", "read-timeout"],
    )
    async def test_a_transient_look_up_failure_is_retried(self, answer: httpx.Response | Exception) -> None:
        adapter, seen = _scripted(answer)
        assert await adapter.find_charge("pay_1") == ChargeResult("succeeded", "ch_1")
        assert len(seen) == 2

    async def test_a_404_that_is_not_charge_not_found_is_no_answer(self) -> None:
        """A gateway without the look-up route must not read as "never charged"."""
        adapter, _ = _scripted(httpx.Response(404, text="Not Found"))
        with pytest.raises(GatewayRejected):
            await adapter.find_charge("pay_1")

    async def test_maps_created_pending_and_declined(self) -> None:
        adapter, _ = _scripted(_ok(201, "pending"))
        assert await adapter.charge(charge_request("pay_1")) == ChargeResult("pending", "ch_1")
        adapter, _ = _scripted(_failure(402, "expired_card", charge_id="ch_9"))
        assert await adapter.charge(charge_request("pay_2")) == ChargeResult(
            "declined", "ch_9", "expired_card", "expired_card!"
        )

    @pytest.mark.parametrize(
        ("status", "code"),
        [
            (400, "invalid_token"),
            (404, "no_such_route"),
            (422, "invalid_amount"),
            (409, "idempotency_key_reused"),
            (410, "gone"),  # any other 4xx: the gateway refused the request itself
        ],
    )
    async def test_permanent_refusals_are_not_retried(self, status: int, code: str) -> None:
        adapter, seen = _scripted(_failure(status, code))
        with pytest.raises(GatewayRejected) as caught:
            await adapter.charge(charge_request("pay_1"))
        assert (caught.value.code, caught.value.message, len(seen)) == (code, f"{code}!", 1)

    @pytest.mark.parametrize(
        "answer",
        [
            _failure(409, "idempotency_key_in_use"), _failure(401, "unauthorized"),
            _failure(403, "forbidden"), _failure(408, "timeout"), _failure(429, "rate_limited"),
            _failure(500, "boom"),
            httpx.Response(502, text="<html>bad gateway</html>"), httpx.Response(200, text="not json"),
            httpx.Response(200, json={"status": "succeeded"}),
            httpx.RemoteProtocolError("peer closed"), httpx.ConnectTimeout("slow"), httpx.ReadError("reset"),
        ],
        ids=["409-in-use", "401", "403", "408", "429", "500", "502-html", "200-not-json", "200-no-id",
             "protocol-error", "connect-timeout", "read-error"],
    )
    async def test_transient_failures_are_retried_with_the_same_key(
        self, answer: httpx.Response | Exception
    ) -> None:
        adapter, seen = _scripted(answer)
        assert await adapter.charge(charge_request("pay_1")) == ChargeResult("succeeded", "ch_1")
        assert [r.headers["Idempotency-Key"] for r in seen] == ["pay_1", "pay_1"]
