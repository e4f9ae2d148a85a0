"""A real payment gateway on 127.0.0.1 for tests (and a manual demo), speaking the wire protocol of
``modules.billing.adapters.http`` over TCP.

It applies the rules of ``modules.billing.adapters.gateway.GatewayLedger`` (kept as ``gw.ledger``), so
the HTTP adapter and ``FakePaymentGateway`` answer the same contract: ``POST /v1/charges`` charges
once per key, ``GET /v1/charges?idempotency_key=`` looks the key's charge up (the reconciler's
question; each look-up is listed in ``lookups``). uvicorn serves a tiny Starlette app on its own
thread. Faults are injected per request, thread-safely: ``fail_next`` (answer an error
without charging), ``delay_next`` (charge, then answer late: a read timeout on a charge that
happened) and ``hold_after_charge`` (charge, then keep the key in flight until released).
``settle_pending`` turns pending charges into signed webhook deliveries, POSTed to ``webhook_url``
when one is given.

Demo: ``python -m tests.support.gateway --port 8790 --api-key KEY --webhook-secret SECRET
[--webhook-url URL] [--auto-settle-after 2]`` serves in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from loguru import logger
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from modules.billing.adapters.gateway import (
    DECLINED,
    PENDING,
    SIGNATURE_HEADER,
    ChargeRequest,
    GatewayEvent,
    GatewayLedger,
    GatewayRejected,
    IdempotencyMismatch,
    encode_event,
    sign_webhook,
)
from tests.support.smtp import free_port

Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, extra headers
Delivery = tuple[GatewayEvent, bytes, dict[str, str]]  # event, body, headers


def _error(status: int, code: str, message: str, **extra: Any) -> Answer:
    return status, {"error": {"code": code, "message": message, **extra}}, {}


class HeldCharge:
    """Handle of ``hold_after_charge``: ``charged`` is set once the ledger has charged."""

    def __init__(self) -> None:
        self.charged = threading.Event()
        self._lock = threading.Lock()
        self._released = False
        self._waker: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def release(self) -> None:
        """Let the held request answer; callable from any thread, before or during the hold."""
        with self._lock:
            self._released, waker = True, self._waker
        if waker is not None:
            with contextlib.suppress(RuntimeError):  # the server's loop is already gone
                waker[0].call_soon_threadsafe(waker[1].set)

    async def _wait(self) -> None:
        released = asyncio.Event()
        with self._lock:
            if self._released:
                return
            self._waker = (asyncio.get_running_loop(), released)
        await released.wait()


class GatewayServer:
    """Start/stop the local gateway; a context manager (``with GatewayServer() as gw:``)."""

    def __init__(
        self,
        webhook_url: str | None = None,
        *,
        api_key: str | None = None,
        webhook_secret: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        auto_settle_after: float | None = None,
        log_level: str = "warning",
    ) -> None:
        self.webhook_url = webhook_url
        self.api_key = api_key or "sk_test_" + secrets.token_hex(16)
        self.webhook_secret = webhook_secret or "whsec_" + secrets.token_hex(16)
        self.host, self.port, self._requested_port = host, port or 0, port
        self.auto_settle_after = auto_settle_after
        self.ledger = GatewayLedger()
        self.requests: list[tuple[str | None, int]] = []  # (Idempotency-Key, status) per charge request
        self.webhook_deliveries: list[tuple[GatewayEvent, int | None]] = []  # None: not delivered
        self._lock = threading.Lock()
        self._failures: tuple[int, int, float | None] = (0, 503, None)  # count, status, Retry-After
        self._lookup_failures: tuple[int, int, float | None] = (0, 503, None)
        self._delay = 0.0
        self._holds: deque[HeldCharge] = deque()
        self._handles: list[HeldCharge] = []
        self._in_flight: set[str] = set()
        self._timers: list[threading.Timer] = []
        self._log_level = log_level
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.lookups: list[tuple[str | None, int]] = []  # (idempotency_key, status) per look-up
        self.app = Starlette(routes=[Route("/v1/charges", self._charges, methods=["POST"]),
                                     Route("/v1/charges", self._find, methods=["GET"])])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- fault injection ------------------------------------------------------------------------

    def fail_next(self, count: int, status: int = 503, retry_after: float | None = None, *,
                  lookups: bool = False) -> None:
        """The next ``count`` charge requests answer ``status`` without charging; ``lookups=True``:
        the next ``count`` look-ups instead."""
        with self._lock:
            if lookups:
                self._lookup_failures = (count, status, retry_after)
            else:
                self._failures = (count, status, retry_after)

    def delay_next(self, seconds: float) -> None:
        """The next charge request that reaches the ledger answers ``seconds`` late."""
        with self._lock:
            self._delay = seconds

    def hold_after_charge(self) -> HeldCharge:
        """The next charge request charges, sets ``charged``, then waits for ``release`` (key in flight)."""
        handle = HeldCharge()
        with self._lock:
            self._holds.append(handle)
            self._handles.append(handle)
        return handle

    def clear_faults(self) -> None:
        """Forget pending fault injections and release every held request."""
        with self._lock:
            self._failures, self._delay = (0, 503, None), 0.0
            self._lookup_failures = (0, 503, None)
            self._holds.clear()
            handles = list(self._handles)
        for handle in handles:
            handle.release()

    # --- the protocol ---------------------------------------------------------------------------

    async def _charges(self, request: Request) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        (status, body, headers), delay = await self._answer(request, key)
        with self._lock:
            self.requests.append((key, status))
        if delay > 0:
            await asyncio.sleep(delay)  # the charge is done and the key free: only the answer is late
        return JSONResponse(body, status, headers=headers)

    async def _find(self, request: Request) -> JSONResponse:
        """``GET /v1/charges?idempotency_key=``: the ledger's charge for the key as it stands now."""
        key = request.query_params.get("idempotency_key")
        status, body, headers = self._find_answer(request, key)
        with self._lock:
            self.lookups.append((key, status))
        return JSONResponse(body, status, headers=headers)

    def _find_answer(self, request: Request, key: str | None) -> Answer:
        failure = self._take_failure(lookup=True)
        if failure is not None:
            return failure
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "unauthorized", "Missing or wrong API key.")
        if not key:
            return _error(400, "invalid_request", "The idempotency_key parameter is required.")
        found = self.ledger.find(key)
        if found is None:
            return _error(404, "charge_not_found", "No charge was made with this idempotency key.")
        result = found.result
        return 200, {"id": result.charge_id, "status": result.status, "amount": found.params["amount"],
                     "currency": found.params["currency"], "failure_code": result.failure_code,
                     "failure_message": result.failure_message}, {}

    def _take_failure(self, *, lookup: bool = False) -> Answer | None:
        """The injected failure for this request, if ``fail_next`` has any left for its kind."""
        with self._lock:
            count, failure_status, retry_after = self._lookup_failures if lookup else self._failures
            if count <= 0:
                return None
            if lookup:
                self._lookup_failures = (count - 1, failure_status, retry_after)
            else:
                self._failures = (count - 1, failure_status, retry_after)
        status, body, headers = _error(failure_status, "injected_failure", "Injected failure.")
        if retry_after is not None:
            headers["Retry-After"] = f"{retry_after:g}"
        return status, body, headers

    async def _answer(self, request: Request, key: str | None) -> tuple[Answer, float]:
        """The answer and how late to send it."""
        failure = self._take_failure()
        if failure is not None:
            return failure, 0.0
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "unauthorized", "Missing or wrong API key."), 0.0
        if not key:
            return _error(400, "idempotency_key_required", "An Idempotency-Key header is required."), 0.0
        try:
            charge = _charge_request(await request.body(), key)
        except ValueError as exc:
            return _error(400, "invalid_request", str(exc)), 0.0
        with self._lock:
            if key in self._in_flight:
                return _error(409, "idempotency_key_in_use", "A request with this key is in progress."), 0.0
            self._in_flight.add(key)
            hold = self._holds.popleft() if self._holds else None
            delay, self._delay = self._delay, 0.0
        try:
            answer = self._charge(charge)
            if hold is not None:
                hold.charged.set()
                await hold._wait()
        finally:
            with self._lock:
                self._in_flight.discard(key)
        return answer, delay

    def _charge(self, charge: ChargeRequest) -> Answer:
        try:
            result = self.ledger.charge(charge)
        except IdempotencyMismatch as exc:
            return _error(409, exc.code, exc.message)
        except GatewayRejected as exc:
            return _error(400, exc.code, exc.message)
        if result.status == DECLINED:
            return _error(402, result.failure_code or "card_declined", result.failure_message or "Declined.",
                          charge_id=result.charge_id)
        if result.status == PENDING and self.auto_settle_after is not None:
            self._schedule_settle(self.auto_settle_after)
        body = {"id": result.charge_id, "status": result.status, "amount": charge.amount,
                "currency": charge.currency}
        return 200, body, {}

    # --- webhooks -------------------------------------------------------------------------------

    def settle_pending(self) -> list[Delivery]:
        """Settle every pending charge; returns the signed deliveries (POSTed to ``webhook_url``)."""
        deliveries: list[Delivery] = []
        for event in self.ledger.settle_pending():
            body = encode_event(event)
            headers = {SIGNATURE_HEADER: sign_webhook(self.webhook_secret, body),
                       "Content-Type": "application/json"}
            deliveries.append((event, body, headers))
            if self.webhook_url is not None:
                self._deliver(event, body, headers)
        return deliveries

    def _deliver(self, event: GatewayEvent, body: bytes, headers: dict[str, str]) -> None:
        status: int | None = None
        try:
            status = httpx.post(str(self.webhook_url), content=body, headers=headers, timeout=5.0).status_code
        except httpx.HTTPError as exc:
            logger.warning("gateway: webhook {} not delivered: {}", event.id, type(exc).__name__)
        with self._lock:
            self.webhook_deliveries.append((event, status))

    def _schedule_settle(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self.settle_pending)  # settles everything pending by then
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> GatewayServer:
        if self._server is not None:
            return self
        self.port = self._requested_port or free_port(self.host)
        config = uvicorn.Config(self.app, host=self.host, port=self.port, log_level=self._log_level,
                                lifespan="off", timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="gateway-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10.0
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the test gateway did not start on {self.host}:{self.port}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.clear_faults()  # held requests must finish for the server to shut down
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10.0)
        self._server = self._thread = None

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _charge_request(raw: bytes, key: str) -> ChargeRequest:
    try:
        data = json.loads(raw)
    except ValueError:
        raise ValueError("The body is not JSON.") from None
    if not isinstance(data, dict):
        raise ValueError("The body must be a JSON object.")
    amount, currency, source = data.get("amount"), data.get("currency"), data.get("source")
    description, metadata = data.get("description", ""), data.get("metadata") or {}
    if type(amount) is not int:
        raise ValueError("amount must be an integer of minor units.")
    if not isinstance(currency, str) or not isinstance(source, str) or not isinstance(description, str):
        raise ValueError("currency and source are required strings; description is a string.")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata must map strings to strings.")
    return ChargeRequest(key, amount, currency, source, description, metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the local test payment gateway.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--api-key")
    parser.add_argument("--webhook-secret")
    parser.add_argument("--webhook-url")
    parser.add_argument("--auto-settle-after", type=float)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with GatewayServer(args.webhook_url, api_key=args.api_key, webhook_secret=args.webhook_secret,
                       host=args.host, port=args.port, auto_settle_after=args.auto_settle_after,
                       log_level="info") as gw:
        print(f"payment gateway listening on {gw.url}", flush=True)
        if not args.api_key or not args.webhook_secret:
            print(f"api key: {gw.api_key}\nwebhook secret: {gw.webhook_secret}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
