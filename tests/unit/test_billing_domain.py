"""The billing domain: state machines, invoice pricing, money formatting and receipts. Pure Python."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core.edge.errors import AppError, Conflict, Unprocessable
from modules.billing.domain import (
    MAX_LINES,
    MAX_QUANTITY,
    TOTAL_MAX,
    InvalidTransition,
    InvoiceStatus,
    Line,
    PaymentStatus,
    PricedLines,
    format_money,
    invoice_transition,
    payment_transition,
    price_lines,
    receipt_email,
)

PRICE_MAX = 10**13
# 100 lines x 10_000 x 10**9 is exactly TOTAL_MAX: prices up to this bound can never be too large.
SAFE_PRICE_MAX = TOTAL_MAX // (MAX_LINES * MAX_QUANTITY)
CURRENCIES = ["EUR", "USD", "GBP", "JPY", "KWD", "CHF"]

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True, slots=True)
class Price:
    """A catalog entry as billing sees it (satisfies ``domain.Priced``)."""

    name: str
    price: int
    currency: str


Requested = list[tuple[uuid.UUID, int]]
Prices = dict[uuid.UUID, Price]


@st.composite
def valid_invoices(
    draw: st.DrawFn, *, min_lines: int = 1, max_lines: int = MAX_LINES, price_max: int = PRICE_MAX
) -> tuple[Requested, Prices, str]:
    """1..100 distinct items, quantities 1..10_000, prices 0..``price_max``, all in one currency."""
    currency = draw(st.sampled_from(CURRENCIES))
    ids = draw(st.lists(st.uuids(), min_size=min_lines, max_size=max_lines, unique=True))
    quantities = draw(st.lists(st.integers(1, MAX_QUANTITY), min_size=len(ids), max_size=len(ids)))
    prices = {
        item_id: Price(draw(st.text(min_size=1, max_size=20)), draw(st.integers(0, price_max)), currency)
        for item_id in ids
    }
    return list(zip(ids, quantities, strict=True)), prices, currency


def _expected_total(requested: Requested, prices: Prices) -> int:
    return sum(prices[i].price * q for i, q in requested)


def _refusal(requested: Requested, prices: Prices) -> Unprocessable:
    with pytest.raises(Unprocessable) as caught:
        price_lines(requested, prices)
    assert caught.value.status == 422
    return caught.value


def _ids(requested: Requested) -> list[str]:
    return [str(i) for i, _ in requested]


def _ok(n: int = 3, currency: str = "EUR", price: int = 100) -> tuple[Requested, Prices]:
    ids = [uuid.uuid4() for _ in range(n)]
    return [(i, 1) for i in ids], {i: Price(f"item {k}", price, currency) for k, i in enumerate(ids)}


# --- state machines ------------------------------------------------------------------------------

INVOICE_ALLOWED = {(InvoiceStatus.OPEN, InvoiceStatus.PAID), (InvoiceStatus.OPEN, InvoiceStatus.VOID)}
PAYMENT_ALLOWED = {
    (PaymentStatus.PENDING, PaymentStatus.SUCCEEDED),
    (PaymentStatus.PENDING, PaymentStatus.FAILED),
}


def _assert_invalid_transition(error: InvalidTransition, kind: str, current: str, target: str) -> None:
    assert isinstance(error, Conflict)
    assert isinstance(error, AppError)
    assert error.status == 409
    assert error.code == "invalid_transition"
    assert error.details == {"status": current, "requested": target}
    assert error.message == f"A {current} {kind} cannot become {target}."


class TestInvoiceTransition:
    @pytest.mark.parametrize(("current", "target"), list(itertools.product(InvoiceStatus, InvoiceStatus)))
    def test_every_pair(self, current: InvoiceStatus, target: InvoiceStatus) -> None:
        if (current, target) in INVOICE_ALLOWED:
            assert invoice_transition(current, target) is target
            return
        with pytest.raises(InvalidTransition) as caught:
            invoice_transition(current, target)
        _assert_invalid_transition(caught.value, "invoice", current.value, target.value)

    def test_exactly_open_to_paid_and_open_to_void_are_allowed(self) -> None:
        allowed = set()
        for current, target in itertools.product(InvoiceStatus, InvoiceStatus):
            try:
                invoice_transition(current, target)
            except InvalidTransition:
                continue
            allowed.add((current, target))
        assert allowed == INVOICE_ALLOWED

    @pytest.mark.parametrize("terminal", [InvoiceStatus.PAID, InvoiceStatus.VOID])
    def test_terminal_states_have_no_way_out(self, terminal: InvoiceStatus) -> None:
        for target in InvoiceStatus:
            with pytest.raises(InvalidTransition):
                invoice_transition(terminal, target)

    def test_details_are_plain_strings(self) -> None:
        with pytest.raises(InvalidTransition) as caught:
            invoice_transition(InvoiceStatus.PAID, InvoiceStatus.VOID)
        assert type(caught.value.details["status"]) is str
        assert type(caught.value.details["requested"]) is str


class TestPaymentTransition:
    @pytest.mark.parametrize(("current", "target"), list(itertools.product(PaymentStatus, PaymentStatus)))
    def test_every_pair(self, current: PaymentStatus, target: PaymentStatus) -> None:
        if (current, target) in PAYMENT_ALLOWED:
            assert payment_transition(current, target) is target
            return
        with pytest.raises(InvalidTransition) as caught:
            payment_transition(current, target)
        _assert_invalid_transition(caught.value, "payment", current.value, target.value)

    def test_exactly_pending_to_succeeded_and_pending_to_failed_are_allowed(self) -> None:
        allowed = set()
        for current, target in itertools.product(PaymentStatus, PaymentStatus):
            try:
                payment_transition(current, target)
            except InvalidTransition:
                continue
            allowed.add((current, target))
        assert allowed == PAYMENT_ALLOWED

    @pytest.mark.parametrize("terminal", [PaymentStatus.SUCCEEDED, PaymentStatus.FAILED])
    def test_terminal_states_have_no_way_out(self, terminal: PaymentStatus) -> None:
        for target in PaymentStatus:
            with pytest.raises(InvalidTransition):
                payment_transition(terminal, target)


# --- price_lines ---------------------------------------------------------------------------------


class TestPriceLines:
    @PROPERTY
    @given(valid_invoices(price_max=SAFE_PRICE_MAX))
    def test_valid_invoices_total_the_lines(self, invoice: tuple[Requested, Prices, str]) -> None:
        requested, prices, currency = invoice

        priced = price_lines(requested, prices)

        assert isinstance(priced, PricedLines)
        assert type(priced.total) is int
        assert priced.total == _expected_total(requested, prices)
        assert 0 <= priced.total <= TOTAL_MAX
        assert priced.currency == currency
        assert [(line.item_id, line.quantity) for line in priced.lines] == requested
        for line in priced.lines:
            assert line.name == prices[line.item_id].name
            assert line.unit_price == prices[line.item_id].price
            assert line.amount == line.unit_price * line.quantity
        assert priced.total == sum(line.amount for line in priced.lines)

    @PROPERTY
    @given(valid_invoices())
    def test_large_prices_are_priced_or_refused_as_too_large(
        self, invoice: tuple[Requested, Prices, str]
    ) -> None:
        requested, prices, currency = invoice
        expected = _expected_total(requested, prices)

        event("too large" if expected > TOTAL_MAX else "priced")
        if expected > TOTAL_MAX:
            error = _refusal(requested, prices)
            assert error.code == "total_too_large"
            assert error.details == {"max": TOTAL_MAX}
        else:
            priced = price_lines(requested, prices)
            assert priced.total == expected
            assert priced.currency == currency
            assert all(line.amount == line.unit_price * line.quantity for line in priced.lines)

    def test_lines_snapshot_name_and_price(self) -> None:
        requested, prices = _ok(2)
        priced = price_lines(requested, prices)
        first = requested[0][0]
        prices[first] = Price("renamed", 999, "EUR")

        assert priced.lines[0].name == "item 0"
        assert priced.lines[0].unit_price == 100
        assert isinstance(priced.lines, tuple)

    def test_a_total_of_exactly_total_max_is_accepted(self) -> None:
        item = uuid.uuid4()
        priced = price_lines([(item, MAX_QUANTITY)], {item: Price("big", TOTAL_MAX // MAX_QUANTITY, "EUR")})

        assert priced.total == TOTAL_MAX

    def test_one_minor_unit_above_total_max_is_refused(self) -> None:
        big, small = uuid.uuid4(), uuid.uuid4()
        prices = {big: Price("big", TOTAL_MAX // MAX_QUANTITY, "EUR"), small: Price("small", 1, "EUR")}

        error = _refusal([(big, MAX_QUANTITY), (small, 1)], prices)

        assert error.code == "total_too_large"
        assert error.details == {"max": TOTAL_MAX}

    def test_the_largest_possible_request_is_refused_not_overflowed(self) -> None:
        requested, prices = _ok(MAX_LINES, price=PRICE_MAX)
        requested = [(i, MAX_QUANTITY) for i, _ in requested]

        assert _refusal(requested, prices).code == "total_too_large"

    def test_zero_priced_items_total_zero(self) -> None:
        requested, prices = _ok(3, price=0)

        assert price_lines(requested, prices).total == 0

    def test_prices_of_items_not_requested_are_ignored(self) -> None:
        requested, prices = _ok(2, currency="EUR")
        prices[uuid.uuid4()] = Price("unrelated", 5, "USD")

        priced = price_lines(requested, prices)

        assert priced.currency == "EUR"
        assert len(priced.lines) == 2

    @PROPERTY
    @given(valid_invoices(min_lines=2), st.data())
    def test_a_second_currency_anywhere_is_refused(
        self, invoice: tuple[Requested, Prices, str], data: st.DataObject
    ) -> None:
        requested, prices, currency = invoice
        index = data.draw(st.integers(0, len(requested) - 1))
        other = data.draw(st.sampled_from([c for c in CURRENCIES if c != currency]))
        item = requested[index][0]
        prices[item] = Price(prices[item].name, prices[item].price, other)

        error = _refusal(requested, prices)

        assert error.code == "mixed_currencies"
        assert error.details == {"currencies": sorted({currency, other})}

    def test_mixed_currencies_lists_every_currency_sorted(self) -> None:
        requested, prices = _ok(3)
        for (item, _), code in zip(requested, ["USD", "EUR", "CHF"], strict=True):
            prices[item] = Price(prices[item].name, 1, code)

        assert _refusal(requested, prices).details == {"currencies": ["CHF", "EUR", "USD"]}

    @PROPERTY
    @given(valid_invoices(), st.data())
    def test_unknown_items_are_listed_exactly(
        self, invoice: tuple[Requested, Prices, str], data: st.DataObject
    ) -> None:
        requested, prices, _ = invoice
        removed = data.draw(st.sets(st.sampled_from([i for i, _ in requested]), min_size=1))
        known = {i: p for i, p in prices.items() if i not in removed}

        error = _refusal(requested, known)

        assert error.code == "unknown_items"
        assert error.details == {"item_ids": [str(i) for i, _ in requested if i in removed]}

    @PROPERTY
    @given(valid_invoices(max_lines=MAX_LINES - 1), st.data())
    def test_a_repeated_item_is_refused(
        self, invoice: tuple[Requested, Prices, str], data: st.DataObject
    ) -> None:
        requested, prices, _ = invoice
        repeated = data.draw(st.sampled_from(requested))
        position = data.draw(st.integers(0, len(requested)))
        requested.insert(position, repeated)

        error = _refusal(requested, prices)

        assert error.code == "duplicate_items"
        assert error.details == {"item_ids": [str(repeated[0])]}

    def test_duplicates_are_listed_once_each_and_sorted(self) -> None:
        requested, prices = _ok(3)
        a, b, c = (i for i, _ in requested)

        error = _refusal([(c, 1), (a, 1), (c, 2), (b, 1), (a, 3), (c, 1)], prices)

        assert error.details == {"item_ids": sorted([str(a), str(c)])}

    @pytest.mark.parametrize("quantity", [0, MAX_QUANTITY + 1, -1])
    def test_quantities_out_of_range_are_refused(self, quantity: int) -> None:
        requested, prices = _ok(3)
        bad = requested[1][0]
        requested[1] = (bad, quantity)

        error = _refusal(requested, prices)

        assert error.code == "invalid_quantity"
        assert error.details == {"item_ids": [str(bad)]}

    @pytest.mark.parametrize("quantity", [1, MAX_QUANTITY])
    def test_quantity_bounds_are_inclusive(self, quantity: int) -> None:
        requested, prices = _ok(1)

        priced = price_lines([(requested[0][0], quantity)], prices)

        assert priced.total == 100 * quantity

    @PROPERTY
    @given(valid_invoices(), st.data())
    def test_every_bad_quantity_is_listed_in_request_order(
        self, invoice: tuple[Requested, Prices, str], data: st.DataObject
    ) -> None:
        requested, prices, _ = invoice
        bad = data.draw(st.sets(st.integers(0, len(requested) - 1), min_size=1))
        for index in bad:
            requested[index] = (requested[index][0], data.draw(st.sampled_from([0, MAX_QUANTITY + 1])))

        error = _refusal(requested, prices)

        assert error.code == "invalid_quantity"
        assert error.details == {"item_ids": [str(requested[k][0]) for k in sorted(bad)]}

    @pytest.mark.parametrize("count", [0, MAX_LINES + 1])
    def test_line_counts_out_of_range_are_refused(self, count: int) -> None:
        requested, prices = _ok(count)

        error = _refusal(requested, prices)

        assert error.code == "invalid_lines"
        assert error.details == {}

    @pytest.mark.parametrize("count", [1, MAX_LINES])
    def test_line_count_bounds_are_inclusive(self, count: int) -> None:
        requested, prices = _ok(count)

        assert len(price_lines(requested, prices).lines) == count


class TestPriceLinesPrecedence:
    """When a request has several faults, the first in this order is reported:

    invalid_lines > duplicate_items > invalid_quantity > unknown_items > mixed_currencies > total_too_large
    (the shape of the request first, then what the catalog says about it).
    """

    def test_too_many_lines_beats_duplicates(self) -> None:
        requested, prices = _ok(MAX_LINES)
        requested.append(requested[0])

        assert _refusal(requested, prices).code == "invalid_lines"

    def test_duplicates_beat_bad_quantities(self) -> None:
        requested, prices = _ok(2)
        requested.append((requested[0][0], 0))

        assert _refusal(requested, prices).code == "duplicate_items"

    def test_bad_quantities_beat_unknown_items(self) -> None:
        requested, prices = _ok(2)
        stranger = uuid.uuid4()

        error = _refusal([*requested, (stranger, 0)], prices)

        assert error.code == "invalid_quantity"
        assert error.details == {"item_ids": [str(stranger)]}

    def test_unknown_items_beat_mixed_currencies(self) -> None:
        requested, prices = _ok(2)
        prices[requested[1][0]] = Price("dollars", 1, "USD")
        stranger = uuid.uuid4()

        assert _refusal([*requested, (stranger, 1)], prices).code == "unknown_items"

    def test_mixed_currencies_beat_a_total_too_large(self) -> None:
        requested, prices = _ok(2, price=PRICE_MAX)
        requested = [(i, MAX_QUANTITY) for i, _ in requested]
        prices[requested[1][0]] = Price("dollars", PRICE_MAX, "USD")

        assert _refusal(requested, prices).code == "mixed_currencies"


# --- format_money --------------------------------------------------------------------------------

EXPONENTS = {"EUR": 2, "USD": 2, "XYZ": 2, "JPY": 0, "KRW": 0, "CLP": 0, "KWD": 3, "BHD": 3, "TND": 3}


class TestFormatMoney:
    @pytest.mark.parametrize(
        ("amount", "currency", "text"),
        [
            (1234, "EUR", "12.34 EUR"),
            (5, "EUR", "0.05 EUR"),
            (50, "EUR", "0.50 EUR"),
            (100, "USD", "1.00 USD"),
            (0, "EUR", "0.00 EUR"),
            (-1234, "EUR", "-12.34 EUR"),
            (-5, "EUR", "-0.05 EUR"),
            (1234, "JPY", "1234 JPY"),
            (0, "JPY", "0 JPY"),
            (-7, "JPY", "-7 JPY"),
            (1234, "KWD", "1.234 KWD"),
            (5, "KWD", "0.005 KWD"),
            (0, "KWD", "0.000 KWD"),
            (-1, "KWD", "-0.001 KWD"),
            (10**15, "EUR", "10000000000000.00 EUR"),
            (1234, "XYZ", "12.34 XYZ"),
        ],
    )
    def test_examples(self, amount: int, currency: str, text: str) -> None:
        assert format_money(amount, currency) == text

    @PROPERTY
    @given(st.integers(-(10**18), 10**18), st.sampled_from(sorted(EXPONENTS)))
    def test_parsing_back_gives_the_amount_in_major_units(self, amount: int, currency: str) -> None:
        exponent = EXPONENTS[currency]

        number, code = format_money(amount, currency).split(" ")
        parsed = Decimal(number)

        assert code == currency
        assert parsed == Decimal(amount).scaleb(-exponent)
        assert parsed * 10**exponent == amount
        assert parsed.as_tuple().exponent == -exponent  # always exactly `exponent` decimals


# --- receipt_email -------------------------------------------------------------------------------

PAID_AT = datetime(2025, 3, 4, 5, 6, tzinfo=UTC)


def _lines() -> tuple[Line, ...]:
    return (
        Line(uuid.uuid4(), "Widget", 250, 4),
        Line(uuid.uuid4(), "Gadget Pro", 1999, 1),
    )


class TestReceiptEmail:
    def test_subject_names_the_total(self) -> None:
        subject, _ = receipt_email("Ada Lovelace", uuid.uuid4(), _lines(), 2999, "EUR", PAID_AT)

        assert subject == "Your Atrium receipt: 29.99 EUR"

    def test_body_lists_lines_total_invoice_and_first_name(self) -> None:
        invoice_id = uuid.uuid4()

        _, body = receipt_email("Ada King Lovelace", invoice_id, _lines(), 2999, "EUR", PAID_AT)

        assert body.startswith("Hi Ada,\n")
        assert "Lovelace" not in body
        assert str(invoice_id) in body
        assert "  4 x Widget: 10.00 EUR" in body.splitlines()
        assert "  1 x Gadget Pro: 19.99 EUR" in body.splitlines()
        assert "Total: 29.99 EUR" in body
        assert "payment of 29.99 EUR" in body
        assert "received 2025-03-04 05:06 UTC" in body

    def test_lines_keep_their_order(self) -> None:
        _, body = receipt_email("Ada", uuid.uuid4(), _lines(), 2999, "EUR", PAID_AT)

        assert body.index("Widget") < body.index("Gadget Pro")

    def test_amounts_follow_the_currency_exponent(self) -> None:
        lines = (Line(uuid.uuid4(), "Tea", 1500, 2),)

        subject, body = receipt_email("Ada", uuid.uuid4(), lines, 3000, "JPY", PAID_AT)

        assert subject == "Your Atrium receipt: 3000 JPY"
        assert "  2 x Tea: 3000 JPY" in body.splitlines()

    @pytest.mark.parametrize("empty", ["", "   ", "\t\n"])
    def test_without_a_name_says_there(self, empty: str) -> None:
        _, body = receipt_email(empty, uuid.uuid4(), _lines(), 2999, "EUR", PAID_AT)

        assert body.startswith("Hi there,\n")

    def test_surrounding_whitespace_is_ignored(self) -> None:
        _, body = receipt_email("  Grace   Hopper ", uuid.uuid4(), _lines(), 2999, "EUR", PAID_AT)

        assert body.startswith("Hi Grace,")
