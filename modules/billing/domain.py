"""Billing rules: invoice totals and the invoice and payment state machines. Pure Python.

Money is an integer of minor units plus an ISO 4217 code; one invoice has one currency.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol

from core.edge.errors import Conflict, NotFound, Unprocessable

MAX_LINES = 100
MAX_QUANTITY = 10_000
# 10**15 minor units is ten trillion in a two-decimal currency: more than any gateway takes in one
# charge, and far inside a 64-bit integer however the lines add up.
TOTAL_MAX = 10**15


class InvoiceStatus(StrEnum):
    OPEN = "open"
    PAID = "paid"
    VOID = "void"


class PaymentStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ReconcileOutcome(StrEnum):
    """What the payment reconciler did with a payment left pending (``atrium_payments_reconciled``)."""

    CHARGED_FOUND = "charged_found"  # the gateway had charged it: recorded as succeeded
    DECLINED_FOUND = "declined_found"  # the gateway had declined it: recorded as failed
    CHARGED_NOW = "charged_now"  # the gateway had never seen it: charged now, with the same key
    DECLINED_NOW = "declined_now"  # ... and that charge was declined or refused
    PENDING_AT_GATEWAY = "pending_at_gateway"  # the gateway has not settled it yet: its webhook will
    MISSING_AT_GATEWAY = "missing_at_gateway"  # it once answered pending and now knows no charge
    GATEWAY_UNAVAILABLE = "gateway_unavailable"  # no answer: left pending for the next run


INVOICE_TRANSITIONS: Mapping[InvoiceStatus, frozenset[InvoiceStatus]] = {
    InvoiceStatus.OPEN: frozenset({InvoiceStatus.PAID, InvoiceStatus.VOID}),
    InvoiceStatus.PAID: frozenset(),
    InvoiceStatus.VOID: frozenset(),
}
PAYMENT_TRANSITIONS: Mapping[PaymentStatus, frozenset[PaymentStatus]] = {
    PaymentStatus.PENDING: frozenset({PaymentStatus.SUCCEEDED, PaymentStatus.FAILED}),
    PaymentStatus.SUCCEEDED: frozenset(),
    PaymentStatus.FAILED: frozenset(),
}


class InvalidTransition(Conflict):
    code = "invalid_transition"

    def __init__(self, kind: str, current: str, target: str) -> None:
        super().__init__(
            f"A {current} {kind} cannot become {target}.",
            details={"status": current, "requested": target},
        )


def invoice_transition(current: InvoiceStatus, target: InvoiceStatus) -> InvoiceStatus:
    """The new status, or ``InvalidTransition`` (409) when the state machine forbids the move."""
    if target not in INVOICE_TRANSITIONS[current]:
        raise InvalidTransition("invoice", current.value, target.value)
    return target


def payment_transition(current: PaymentStatus, target: PaymentStatus) -> PaymentStatus:
    if target not in PAYMENT_TRANSITIONS[current]:
        raise InvalidTransition("payment", current.value, target.value)
    return target


# --- invoice lines and totals ----------------------------------------------------------------------


class Priced(Protocol):
    """What billing needs to know of an item at invoicing time."""

    @property
    def name(self) -> str: ...
    @property
    def price(self) -> int: ...
    @property
    def currency(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Line:
    item_id: uuid.UUID
    name: str
    unit_price: int
    quantity: int

    @property
    def amount(self) -> int:
        return self.unit_price * self.quantity


@dataclass(frozen=True, slots=True)
class PricedLines:
    lines: tuple[Line, ...]
    currency: str
    total: int


def price_lines(
    requested: Sequence[tuple[uuid.UUID, int]], prices: Mapping[uuid.UUID, Priced]
) -> PricedLines:
    """Turn ``(item_id, quantity)`` pairs into invoice lines at the given prices.

    Refuses (422) unknown items, an item listed twice, quantities out of range, several
    currencies on one invoice and a total beyond ``TOTAL_MAX``.
    """
    if not 1 <= len(requested) <= MAX_LINES:
        raise Unprocessable(f"An invoice has 1 to {MAX_LINES} lines.", code="invalid_lines")
    counts = Counter(i for i, _ in requested)
    duplicates = sorted(str(i) for i, n in counts.items() if n > 1)
    if duplicates:
        raise Unprocessable("Each item may appear on one line only; use its quantity.",
                            code="duplicate_items", details={"item_ids": duplicates})
    bad_quantities = [str(i) for i, q in requested if not 1 <= q <= MAX_QUANTITY]
    if bad_quantities:
        raise Unprocessable(f"Quantities are whole numbers from 1 to {MAX_QUANTITY}.",
                            code="invalid_quantity", details={"item_ids": bad_quantities})
    unknown = [str(i) for i, _ in requested if i not in prices]
    if unknown:
        raise Unprocessable("Some items do not exist.", code="unknown_items", details={"item_ids": unknown})
    currencies = sorted({prices[i].currency for i, _ in requested})
    if len(currencies) > 1:
        raise Unprocessable("All items on one invoice must be priced in the same currency.",
                            code="mixed_currencies", details={"currencies": currencies})
    lines = tuple(Line(i, prices[i].name, prices[i].price, q) for i, q in requested)
    total = sum(line.amount for line in lines)
    if total > TOTAL_MAX:
        raise Unprocessable("The invoice total is too large.", code="total_too_large",
                            details={"max": TOTAL_MAX})
    return PricedLines(lines, currencies[0], total)


# --- money formatting (receipts) -----------------------------------------------------------------

# ISO 4217 minor-unit exponents that are not 2.
_EXPONENTS = {
    **dict.fromkeys(["BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX",
                     "VND", "VUV", "XAF", "XOF", "XPF"], 0),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], 3),
}


def format_money(amount: int, currency: str) -> str:
    """``1234, "EUR"`` -> ``"12.34 EUR"``; exact (integer arithmetic), honouring the currency's exponent."""
    exponent = _EXPONENTS.get(currency, 2)
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**exponent)
    return f"{sign}{whole}.{fraction:0{exponent}d} {currency}" if exponent else f"{sign}{whole} {currency}"


def receipt_email(full_name: str, invoice_id: uuid.UUID, lines: Sequence[Line], total: int,
                  currency: str, paid_at: datetime) -> tuple[str, str]:
    """Subject and body of the receipt sent after a successful payment."""
    first = full_name.split()[0] if full_name.split() else "there"
    rows = "\n".join(
        f"  {line.quantity} x {line.name}: {format_money(line.amount, currency)}" for line in lines
    )
    return (
        f"Your Atrium receipt: {format_money(total, currency)}",
        f"Hi {first},\n\nthank you for your payment of {format_money(total, currency)} for invoice "
        f"{invoice_id}, received {paid_at:%Y-%m-%d %H:%M} UTC.\n\n{rows}\n\n"
        f"Total: {format_money(total, currency)}\n\n— Atrium",
    )


# --- errors --------------------------------------------------------------------------------------


class InvoiceNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Invoice not found.")


class PaymentNotFound(NotFound):
    def __init__(self) -> None:
        super().__init__("Payment not found.")


class InvoiceNotPayable(Conflict):
    code = "invoice_not_open"

    def __init__(self, status: str) -> None:
        super().__init__(f"Only an open invoice can be paid; this one is {status}.",
                         details={"status": status})


class PaymentInProgress(Conflict):
    code = "payment_in_progress"

    def __init__(self, payment_id: uuid.UUID) -> None:
        super().__init__("A payment for this invoice is still being processed.",
                         details={"payment_id": str(payment_id)})


class NothingToPay(Conflict):
    code = "nothing_to_pay"

    def __init__(self) -> None:
        super().__init__("This invoice totals zero; there is nothing to charge.")
