"""The HTTP adapter of billing's payment-gateway port (``adapters.gateway.PaymentGateway``), over httpx.

Why it retries the way it does: a charge that timed out may well have happened at the gateway,
so the adapter can never tell "not charged" from "charged, answer lost". Every attempt therefore
carries the SAME ``Idempotency-Key`` (the payment's id); the gateway answers a repeated key with
the first charge, so retrying can recover the result without charging twice. Retries are only for
transient failures (timeouts, connection errors, 401/403/408/409-in-use/429/5xx, unreadable 2xx
bodies), with exponential backoff plus jitter and a numeric ``Retry-After`` honoured up to
``max_backoff``; once ``max_attempts`` are spent the caller gets ``GatewayUnavailable`` and retries
later, again with the same key. Permanent refusals raise ``GatewayRejected``; a declined card is a
``ChargeResult``, not an error.

The wire protocol (served for tests by ``tests.support.gateway``):
``POST /v1/charges`` with ``Authorization: Bearer <api key>``, ``Idempotency-Key`` and a JSON body
``{"amount", "currency", "source", "description", "metadata"}``; 200/201 answer
``{"id", "status", "amount", "currency"}``, every failure ``{"error": {"code", "message", ...}}``
(402 adds the declined ``charge_id``). ``GET /v1/charges?idempotency_key=<key>`` looks a charge up
without making one: 200 ``{"id", "status", "amount", "currency", "failure_code", "failure_message"}``
(``status`` may be ``declined``), 404 ``charge_not_found`` when that key was never charged; it is
retried like a charge.

Connection pools are bound to the event loop that opened them, and the adapter is shared by the
API's loop and a worker's loop thread, so it keeps one ``httpx.AsyncClient`` per running loop.
Neither the API key nor the card token ever appears in a log line or an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
from loguru import logger

from modules.billing.adapters.gateway import (
    DECLINED,
    PENDING,
    SIGNATURE_HEADER,
    SUCCEEDED,
    ChargeRequest,
    ChargeResult,
    GatewayEvent,
    GatewayRejected,
    GatewayUnavailable,
    verify_webhook,
)

T = TypeVar("T")

CHARGES_PATH = "/v1/charges"
# 4xx answers worth retrying (409 only when not ``idempotency_key_reused``); any other 4xx is permanent.
TRANSIENT_4XX = frozenset({401, 403, 408, 409, 429})


class _Transient(Exception):
    """One failed attempt that may succeed if repeated with the same idempotency key."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class HttpPaymentGateway:
    """``PaymentGateway`` over HTTP; see the module docstring for the protocol and retry rules."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        webhook_secret: str,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        max_attempts: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._api_key = api_key
        self._webhook_secret = webhook_secret
        self._timeout = httpx.Timeout(timeout, connect=connect_timeout)
        self._transport = transport  # shared by every client when given (tests: httpx.MockTransport)
        self._clients: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # no secrets
        return f"HttpPaymentGateway({self.base_url!r}, max_attempts={self.max_attempts})"

    # --- the port ---------------------------------------------------------------------------------

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        body = {
            "amount": request.amount,
            "currency": request.currency,
            "source": request.token,
            "description": request.description,
            "metadata": dict(request.metadata),
        }
        headers = {"Idempotency-Key": request.idempotency_key}

        async def attempt() -> ChargeResult:
            return _interpret(await self._client().post(CHARGES_PATH, json=body, headers=headers))

        return await self._with_retries(request.idempotency_key, attempt)

    async def find_charge(self, idempotency_key: str) -> ChargeResult | None:
        """``GET /v1/charges?idempotency_key=``: 200 the charge as it stands, 404 ``charge_not_found``."""

        async def attempt() -> ChargeResult | None:
            response = await self._client().get(CHARGES_PATH, params={"idempotency_key": idempotency_key})
            return _interpret_lookup(response)

        return await self._with_retries(idempotency_key, attempt)

    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> GatewayEvent:
        return verify_webhook(self._webhook_secret, body, _header(headers, SIGNATURE_HEADER))

    async def aclose(self) -> None:
        """Close every client: this loop's here, another running loop's on that loop.

        Clients of loops already closed are dropped (their connections went with the loop).
        """
        with self._lock:
            clients, self._clients = self._clients, {}
        current = asyncio.get_running_loop()
        for loop, client in clients.items():
            if loop is current:
                await client.aclose()
            elif loop.is_running():
                with contextlib.suppress(Exception):  # that loop may be stopping under us
                    future = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
                    await asyncio.wait_for(asyncio.wrap_future(future), timeout=5.0)

    # --- internals --------------------------------------------------------------------------------

    async def _with_retries(self, key: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it answers, retrying transient failures; then ``GatewayUnavailable``."""
        reason = "no attempt made"
        for number in range(1, self.max_attempts + 1):
            try:
                return await attempt()
            except _Transient as failure:
                reason, retry_after = failure.reason, failure.retry_after
            except httpx.TimeoutException as exc:
                reason, retry_after = f"timeout ({type(exc).__name__})", None
            except httpx.RequestError as exc:  # connect, protocol, network, decoding errors
                reason, retry_after = type(exc).__name__, None
            if number == self.max_attempts:
                break
            delay = self._delay(number, retry_after)
            logger.warning(
                "payment gateway: attempt {attempt}/{max_attempts} for key {key} failed ({reason}); "
                "retrying in {delay:.2f}s",
                attempt=number, max_attempts=self.max_attempts, key=key, reason=reason, delay=delay,
            )
            await asyncio.sleep(delay)
        raise GatewayUnavailable(
            f"payment gateway unavailable after {self.max_attempts} attempt(s): {reason}"
        )

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                for stale in [other for other in self._clients if other.is_closed()]:
                    del self._clients[stale]
                client = httpx.AsyncClient(
                    base_url=self.base_url,
                    timeout=self._timeout,
                    transport=self._transport,
                    headers={"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"},
                )
                self._clients[loop] = client
            return client

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_backoff)
        ceiling: float = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)  # "equal jitter": spreads retries out


def _interpret(response: httpx.Response) -> ChargeResult:
    """A result, ``GatewayRejected`` (permanent) or ``_Transient`` (retry with the same key)."""
    status = response.status_code
    if 200 <= status < 300:
        payload = _json(response)
        charge_id, charge_status = payload.get("id"), payload.get("status")
        if not isinstance(charge_id, str) or charge_status not in (SUCCEEDED, PENDING):
            raise _Transient(f"HTTP {status} with an unreadable body")
        return ChargeResult(charge_status, charge_id=charge_id)

    error = _error(response)
    code, message = str(error.get("code") or ""), str(error.get("message") or "")
    if status == 402:
        charge_id = str(error["charge_id"]) if error.get("charge_id") else None
        return ChargeResult(DECLINED, charge_id, code or "declined", message or None)
    if status == 409 and code == "idempotency_key_reused":
        raise GatewayRejected(code, message or "This idempotency key was used with other parameters.")
    if status in TRANSIENT_4XX or status >= 500 or status < 400:
        raise _Transient(f"HTTP {status} {code}".rstrip(), _retry_after(response))
    raise GatewayRejected(code or f"http_{status}", message or f"The gateway refused the request ({status}).")


def _interpret_lookup(response: httpx.Response) -> ChargeResult | None:
    """A look-up's answer: the charge, None for ``charge_not_found``, else as ``_interpret`` fails."""
    status = response.status_code
    if status == 404 and _error(response).get("code") == "charge_not_found":
        return None
    if status != 200:
        _interpret(response)  # raises for every failure status
        raise _Transient(f"HTTP {status} to a look-up")
    payload = _json(response)
    charge_id, charge_status = payload.get("id"), payload.get("status")
    if not isinstance(charge_id, str) or charge_status not in (SUCCEEDED, PENDING, DECLINED):
        raise _Transient(f"HTTP {status} with an unreadable body")
    if charge_status != DECLINED:
        return ChargeResult(charge_status, charge_id)
    code, message = payload.get("failure_code"), payload.get("failure_message")
    return ChargeResult(DECLINED, charge_id, str(code) if code else "declined",
                        str(message) if message else None)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise _Transient(f"HTTP {response.status_code} with an unreadable body")
    return payload


def _error(response: httpx.Response) -> dict[str, Any]:
    """The ``error`` object of a failure body, or ``{}`` when there is none to read."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: fall back to the computed backoff
    return seconds if math.isfinite(seconds) else None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    return next((value for key, value in headers.items() if key.lower() == lowered), None)
