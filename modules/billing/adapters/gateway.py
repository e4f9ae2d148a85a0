"""The payment-gateway port: charge a tokenised card once, learn late results from signed webhooks.

Every charge carries an idempotency key (the payment's id). A gateway that sees the same key again
returns the first charge instead of making a second one, so a job may safely call ``charge`` again
after a timeout, a retry or a crash: that is what makes "charged at most once" hold end to end.
``find_charge`` asks what became of a key without charging: the payment reconciler's question about
a payment left ``pending`` by a crash.

Two adapters: ``FakePaymentGateway`` (in memory, deterministic, for development and tests) and
``HttpPaymentGateway`` (httpx, for a real gateway; see ``modules.billing.adapters.http``). Both apply the same
rules, kept in ``GatewayLedger``, which the local test gateway server serves over HTTP as well.

Deterministic tokens: ``tok_chargeDeclined`` (card_declined), ``tok_insufficientFunds``
(insufficient_funds), ``tok_expiredCard`` (expired_card) are declined; ``tok_async`` and
``tok_asyncDeclined`` answer ``pending`` and settle later by webhook; any other ``tok_*`` token
succeeds; anything else is an invalid request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

ChargeStatus = Literal["succeeded", "pending", "declined"]
SUCCEEDED: Final = "succeeded"
PENDING: Final = "pending"
DECLINED: Final = "declined"

SIGNATURE_HEADER = "Atrium-Gateway-Signature"
SIGNATURE_TOLERANCE_SECONDS = 300

DECLINES = {
    "tok_chargeDeclined": ("card_declined", "The card was declined."),
    "tok_insufficientFunds": ("insufficient_funds", "The card has insufficient funds."),
    "tok_expiredCard": ("expired_card", "The card has expired."),
}
ASYNC_TOKENS: dict[str, ChargeStatus] = {"tok_async": SUCCEEDED, "tok_asyncDeclined": DECLINED}


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    idempotency_key: str
    amount: int  # minor units, > 0
    currency: str  # ISO 4217, upper case
    token: str
    description: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    def params(self) -> dict[str, Any]:
        """What the gateway compares when a key comes back: the same key must mean the same charge."""
        return {"amount": self.amount, "currency": self.currency, "source": self.token}


@dataclass(frozen=True, slots=True)
class ChargeResult:
    status: ChargeStatus
    charge_id: str | None = None
    failure_code: str | None = None
    failure_message: str | None = None


@dataclass(frozen=True, slots=True)
class GatewayEvent:
    """A verified webhook: the final result of a charge that first answered ``pending``."""

    id: str
    type: str  # "charge.succeeded" | "charge.failed"
    charge_id: str
    idempotency_key: str
    status: ChargeStatus
    failure_code: str | None = None
    failure_message: str | None = None


class GatewayError(Exception):
    """Base of the gateway failures a caller must handle."""


class GatewayUnavailable(GatewayError):
    """Transient: timeouts, 5xx, rate limits. Retry later with the same idempotency key."""


class GatewayRejected(GatewayError):
    """Permanent: the gateway refused the request itself (bad token, bad amount); retrying cannot help."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidWebhook(Exception):
    """A webhook whose signature, timestamp or body does not check out."""


class PaymentGateway(Protocol):
    async def charge(self, request: ChargeRequest) -> ChargeResult:
        """Charge once per idempotency key; raises ``GatewayUnavailable`` or ``GatewayRejected``."""
        ...

    async def find_charge(self, idempotency_key: str) -> ChargeResult | None:
        """The charge made for this key as it stands now (``pending`` until settled), or None when the
        gateway never made one; raises ``GatewayUnavailable``. Asks, never charges."""
        ...

    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> GatewayEvent:
        """Verify and decode a webhook; raises ``InvalidWebhook``."""
        ...

    async def aclose(self) -> None: ...


# --- webhook signatures --------------------------------------------------------------------------


def sign_webhook(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "t." + body>``."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify_webhook(
    secret: str, body: bytes, header: str | None, *, tolerance: int = SIGNATURE_TOLERANCE_SECONDS,
    now: float | None = None,
) -> GatewayEvent:
    """Check the signature and its age (replays of old deliveries are refused), then decode."""
    if not header:
        raise InvalidWebhook("missing signature")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        parts.setdefault(name, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        raise InvalidWebhook("malformed signature header") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise InvalidWebhook("signature timestamp outside the tolerance")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, candidate) for candidate in parts.get("v1", [])):
        raise InvalidWebhook("signature does not match")
    return decode_event(body)


def encode_event(event: GatewayEvent) -> bytes:
    return json.dumps({
        "id": event.id,
        "type": event.type,
        "data": {
            "charge_id": event.charge_id,
            "idempotency_key": event.idempotency_key,
            "status": event.status,
            "failure_code": event.failure_code,
            "failure_message": event.failure_message,
        },
    }, separators=(",", ":")).encode()


def decode_event(body: bytes) -> GatewayEvent:
    try:
        raw = json.loads(body)
        data = raw["data"]
        status = data["status"]
        if status not in (SUCCEEDED, DECLINED) or raw["type"] not in ("charge.succeeded", "charge.failed"):
            raise ValueError(status)
        return GatewayEvent(
            id=str(raw["id"]), type=str(raw["type"]), charge_id=str(data["charge_id"]),
            idempotency_key=str(data["idempotency_key"]), status=status,
            failure_code=data.get("failure_code"), failure_message=data.get("failure_message"),
        )
    except (ValueError, KeyError, TypeError):
        raise InvalidWebhook("malformed event body") from None


# --- the deterministic rules, shared by the fake adapter and the local gateway server -----------


@dataclass
class LedgerCharge:
    id: str
    idempotency_key: str
    params: dict[str, Any]
    result: ChargeResult
    settle_to: ChargeStatus | None = None  # for pending charges: the status the webhook will carry


class IdempotencyMismatch(GatewayRejected):
    def __init__(self) -> None:
        super().__init__("idempotency_key_reused", "This idempotency key was used with other parameters.")


class GatewayLedger:
    """Charges by idempotency key; thread-safe (the local server runs it from its own thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.charges: dict[str, LedgerCharge] = {}  # by idempotency key
        self.requests: list[str] = []  # every idempotency key seen, in order, replays included

    def charge(self, request: ChargeRequest) -> ChargeResult:
        with self._lock:
            self.requests.append(request.idempotency_key)
            existing = self.charges.get(request.idempotency_key)
            if existing is not None:
                if existing.params != request.params():
                    raise IdempotencyMismatch()
                return existing.result
            result, settle_to = self._decide(request)
            charge_id = result.charge_id
            if charge_id is not None:
                self.charges[request.idempotency_key] = LedgerCharge(
                    charge_id, request.idempotency_key, request.params(), result, settle_to
                )
            return result

    def find(self, idempotency_key: str) -> LedgerCharge | None:
        """The charge made for this key, as it stands now; None when none was made. A look-up is not
        a charge attempt: ``requests`` does not list it."""
        with self._lock:
            return self.charges.get(idempotency_key)

    @staticmethod
    def _decide(request: ChargeRequest) -> tuple[ChargeResult, ChargeStatus | None]:
        if not request.token.startswith("tok_") or len(request.token) > 255:
            raise GatewayRejected("invalid_token", "The payment token is not valid.")
        if request.amount <= 0:
            raise GatewayRejected("invalid_amount", "The amount must be positive.")
        charge_id = "ch_" + secrets.token_hex(12)
        if request.token in DECLINES:
            code, message = DECLINES[request.token]
            return ChargeResult(DECLINED, charge_id, code, message), None
        if request.token in ASYNC_TOKENS:
            return ChargeResult(PENDING, charge_id), ASYNC_TOKENS[request.token]
        return ChargeResult(SUCCEEDED, charge_id), None

    def successful_charges(self, idempotency_key: str | None = None) -> list[LedgerCharge]:
        """Charges that took money (now or once settled), optionally for one key."""
        with self._lock:
            return [
                c for c in self.charges.values()
                if (c.result.status == SUCCEEDED or c.settle_to == SUCCEEDED)
                and (idempotency_key is None or c.idempotency_key == idempotency_key)
            ]

    def settle_pending(self) -> list[GatewayEvent]:
        """Settle every pending charge; returns the webhook events to deliver."""
        events: list[GatewayEvent] = []
        with self._lock:
            for c in self.charges.values():
                if c.result.status != PENDING or c.settle_to is None:
                    continue
                declined = c.settle_to == DECLINED
                code, message = DECLINES["tok_chargeDeclined"] if declined else (None, None)
                c.result = ChargeResult(c.settle_to, c.id, code, message)
                events.append(GatewayEvent(
                    id="evt_" + secrets.token_hex(12),
                    type="charge.failed" if declined else "charge.succeeded",
                    charge_id=c.id, idempotency_key=c.idempotency_key, status=c.settle_to,
                    failure_code=code, failure_message=message,
                ))
        return events


class FakePaymentGateway:
    """In-process gateway with the ledger's rules; ``fail_next`` injects transient failures."""

    def __init__(self, webhook_secret: str) -> None:
        self.ledger = GatewayLedger()
        self.webhook_secret = webhook_secret
        self._failures = 0
        self._lookup_failures = 0
        self._lock = threading.Lock()

    def fail_next(self, count: int, *, lookups: bool = False) -> None:
        """The next ``count`` charge calls raise ``GatewayUnavailable`` (before any charge is made);
        ``lookups=True``: the next ``count`` ``find_charge`` calls instead."""
        with self._lock:
            if lookups:
                self._lookup_failures = count
            else:
                self._failures = count

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        with self._lock:
            if self._failures > 0:
                self._failures -= 1
                raise GatewayUnavailable("injected gateway outage")
        return self.ledger.charge(request)

    async def find_charge(self, idempotency_key: str) -> ChargeResult | None:
        with self._lock:
            if self._lookup_failures > 0:
                self._lookup_failures -= 1
                raise GatewayUnavailable("injected gateway outage")
        found = self.ledger.find(idempotency_key)
        return None if found is None else found.result

    def parse_webhook(self, body: bytes, headers: Mapping[str, str]) -> GatewayEvent:
        return verify_webhook(self.webhook_secret, body, _header(headers, SIGNATURE_HEADER))

    def signed(self, event: GatewayEvent) -> tuple[bytes, dict[str, str]]:
        """A webhook delivery for ``event`` as the gateway would send it: body and headers."""
        body = encode_event(event)
        return body, {SIGNATURE_HEADER: sign_webhook(self.webhook_secret, body),
                      "Content-Type": "application/json"}

    async def aclose(self) -> None:
        return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lowered = name.lower()
    for key, value in headers.items():
        if key.lower() == lowered:
            return value
    return None
