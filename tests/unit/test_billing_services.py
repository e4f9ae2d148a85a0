"""Billing use cases against a real database, with in-memory adapters for everything else.

Every test runs on SQLite and on PostgreSQL (the ``session`` fixture) inside a transaction that is
rolled back afterwards; nothing here commits. The items and users modules are fakes of their public
facades; the gateway, outbox, inbox and email sender are the in-process adapters from ``core``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from core.db.base import utcnow
from core.db.engine import create_engine
from core.db.session import UnitOfWork, session_factory
from core.edge.errors import NotFound, Unprocessable
from core.edge.pagination import CursorCodec
from core.email import InMemoryEmailSender
from core.messaging.outbox import EVENT, JOB, Inbox, Outbox, OutboxMessage
from core.messaging.periodic import PeriodicContext
from core.security import Principal
from modules.billing.adapters.gateway import (
    DECLINED,
    SUCCEEDED,
    ChargeRequest,
    ChargeResult,
    FakePaymentGateway,
    GatewayEvent,
    GatewayUnavailable,
)
from modules.billing.domain import (
    InvoiceNotFound,
    InvoiceNotPayable,
    InvoiceStatus,
    NothingToPay,
    PaymentInProgress,
    PaymentNotFound,
    PaymentStatus,
    ReconcileOutcome,
    format_money,
)
from modules.billing.metrics import ReconcileMetrics
from modules.billing.models import InvoiceLineRow, InvoiceRow, PaymentRow
from modules.billing.public import PaymentFailed, PaymentSucceeded
from modules.billing.repository import InvoiceRepository, PaymentRepository
from modules.billing.service.invoices import Invoice, InvoiceService
from modules.billing.service.payments import CHARGE_TASK, Payment, PaymentService
from modules.billing.tasks import reconcile_payments
from modules.items.public import ItemPrice
from modules.users.public import UserSummary

SECRET = "billing-service-tests-0123456789-abcdefghijklmnop"


# --- fakes of the other modules' facades ---------------------------------------------------------


@dataclass
class FakeItems:
    """``ItemsFacade``: a catalog in a dict; records the ids asked for in each call."""

    catalog: dict[uuid.UUID, ItemPrice] = field(default_factory=dict)
    calls: list[frozenset[uuid.UUID]] = field(default_factory=list)

    def add(self, name: str, price: int, currency: str = "EUR") -> uuid.UUID:
        item_id = uuid.uuid4()
        self.catalog[item_id] = ItemPrice(item_id, name, price, currency)
        return item_id

    async def prices(
        self, session: AsyncSession, item_ids: Collection[uuid.UUID]
    ) -> dict[uuid.UUID, ItemPrice]:
        self.calls.append(frozenset(item_ids))
        return {i: self.catalog[i] for i in item_ids if i in self.catalog}


@dataclass
class FakeUsers:
    """``UsersFacade``: users in a dict."""

    users: dict[uuid.UUID, UserSummary] = field(default_factory=dict)
    calls: list[uuid.UUID] = field(default_factory=list)

    def add(self, full_name: str = "Ada Lovelace", *, is_admin: bool = False) -> UserSummary:
        user_id = uuid.uuid4()
        user = UserSummary(user_id, f"user-{user_id.hex[:12]}@billing.test", full_name, is_admin)
        self.users[user_id] = user
        return user

    async def get_user(self, session: AsyncSession, user_id: uuid.UUID) -> UserSummary | None:
        self.calls.append(user_id)
        return self.users.get(user_id)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def items() -> FakeItems:
    return FakeItems()


@pytest.fixture
def users() -> FakeUsers:
    return FakeUsers()


@pytest.fixture
def gateway() -> FakePaymentGateway:
    return FakePaymentGateway("webhook-secret")


@pytest.fixture
def email() -> InMemoryEmailSender:
    return InMemoryEmailSender()


@pytest.fixture
def invoices(items: FakeItems) -> InvoiceService:
    return InvoiceService(InvoiceRepository(), PaymentRepository(), items, CursorCodec(SECRET))


@pytest.fixture
def payments(
    invoices: InvoiceService, gateway: FakePaymentGateway, users: FakeUsers, email: InMemoryEmailSender
) -> PaymentService:
    return PaymentService(invoices, InvoiceRepository(), PaymentRepository(), Outbox(), Inbox(), gateway,
                          users, email)


@pytest.fixture
def owner(users: FakeUsers) -> Principal:
    return Principal(users.add("Ada King Lovelace").id, False)


@pytest.fixture
def admin() -> Principal:
    return Principal(uuid.uuid4(), True)


@pytest.fixture
def stranger() -> Principal:
    return Principal(uuid.uuid4(), False)


# --- helpers -------------------------------------------------------------------------------------


async def _invoice(session: AsyncSession, invoices: InvoiceService, items: FakeItems, principal: Principal,
                   *lines: tuple[str, int, int], currency: str = "EUR") -> Invoice:
    """Open an invoice of (name, unit price, quantity) lines; one widget at 12.50 by default."""
    lines = lines or (("Widget", 1250, 1),)
    requested = [(items.add(name, price, currency), quantity) for name, price, quantity in lines]
    return await invoices.create(session, principal, requested)


async def _payment(session: AsyncSession, payment_id: uuid.UUID) -> dict[str, Any]:
    """The payment's columns as stored (a Core query, not the identity map)."""
    await session.flush()
    row = (await session.execute(
        select(PaymentRow.status, PaymentRow.failure_code, PaymentRow.failure_message,
               PaymentRow.gateway_charge_id, PaymentRow.settled_at)
        .where(PaymentRow.id == payment_id)
    )).one()
    return dict(row._mapping)


async def _invoice_state(session: AsyncSession, invoice_id: uuid.UUID) -> dict[str, Any]:
    await session.flush()
    row = (await session.execute(
        select(InvoiceRow.status, InvoiceRow.paid_at, InvoiceRow.voided_at).where(InvoiceRow.id == invoice_id)
    )).one()
    return dict(row._mapping)


async def _outbox(session: AsyncSession, kind: str, name: str, payment_id: uuid.UUID) -> list[OutboxMessage]:
    """Outbox rows of ``kind``/``name`` about one payment, as stored in the session's transaction."""
    await session.flush()
    rows = (await session.execute(
        select(OutboxMessage).where(OutboxMessage.kind == kind, OutboxMessage.name == name)
    )).scalars().all()
    return [row for row in rows if row.payload.get("payment_id") == str(payment_id)]


async def _succeeded_events(session: AsyncSession, payment_id: uuid.UUID) -> list[OutboxMessage]:
    return await _outbox(session, EVENT, PaymentSucceeded.name, payment_id)


async def _failed_events(session: AsyncSession, payment_id: uuid.UUID) -> list[OutboxMessage]:
    return await _outbox(session, EVENT, PaymentFailed.name, payment_id)


async def _started(
    session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
    principal: Principal, token: str = "tok_visa",
) -> tuple[Invoice, Payment]:
    """An invoice of 2 x 12.50 + 1 x 4.99 EUR (29.99) and a payment started on it with ``token``."""
    invoice = await _invoice(session, invoices, items, principal, ("Widget", 1250, 2), ("Gadget", 499, 1))
    return invoice, await payments.start(session, principal, invoice.id, token)


# --- invoices ------------------------------------------------------------------------------------


class TestCreate:
    async def test_prices_every_line_with_one_lookup(
        self, session: AsyncSession, invoices: InvoiceService, items: FakeItems, owner: Principal
    ) -> None:
        requested = [(items.add(f"item {n}", 100 * n + 1), n) for n in range(1, 21)]

        invoice = await invoices.create(session, owner, requested)

        assert items.calls == [frozenset(i for i, _ in requested)]
        assert invoice.user_id == owner.user_id
        assert invoice.status == InvoiceStatus.OPEN.value
        assert invoice.currency == "EUR"
        assert invoice.total == sum((100 * n + 1) * n for n in range(1, 21))
        assert [(line.item_id, line.quantity) for line in invoice.lines] == requested
        assert invoice.paid_at is None
        assert invoice.voided_at is None

    async def test_each_invoice_looks_prices_up_once(
        self, session: AsyncSession, invoices: InvoiceService, items: FakeItems, owner: Principal
    ) -> None:
        first = await _invoice(session, invoices, items, owner, ("A", 1, 1), ("B", 2, 2), ("C", 3, 3))
        second = await _invoice(session, invoices, items, owner, ("D", 4, 4))

        assert len(items.calls) == 2
        assert items.calls[0] == {line.item_id for line in first.lines}
        assert items.calls[1] == {line.item_id for line in second.lines}

    async def test_stores_the_invoice_and_its_lines_in_order(
        self, session: AsyncSession, invoices: InvoiceService, items: FakeItems, owner: Principal
    ) -> None:
        invoice = await _invoice(session, invoices, items, owner, ("Widget", 1250, 2), ("Gadget", 499, 3),
                                 currency="USD")

        stored = (await session.execute(
            select(InvoiceRow.user_id, InvoiceRow.status, InvoiceRow.currency, InvoiceRow.total)
            .where(InvoiceRow.id == invoice.id)
        )).one()
        lines = (await session.execute(
            select(InvoiceLineRow.position, InvoiceLineRow.name, InvoiceLineRow.unit_price,
                   InvoiceLineRow.quantity, InvoiceLineRow.amount)
            .where(InvoiceLineRow.invoice_id == invoice.id).order_by(InvoiceLineRow.position)
        )).all()

        assert tuple(stored) == (owner.user_id, "open", "USD", 2 * 1250 + 3 * 499)
        assert [tuple(line) for line in lines] == [(1, "Widget", 1250, 2, 2500), (2, "Gadget", 499, 3, 1497)]

    async def test_a_refused_request_stores_nothing(
        self, session: AsyncSession, invoices: InvoiceService, items: FakeItems, owner: Principal
    ) -> None:
        known, unknown = items.add("Widget", 100), uuid.uuid4()

        with pytest.raises(Unprocessable) as caught:
            await invoices.create(session, owner, [(known, 1), (unknown, 1)])

        assert caught.value.code == "unknown_items"
        assert caught.value.details == {"item_ids": [str(unknown)]}
        assert items.calls == [frozenset({known, unknown})]
        stored = await session.execute(select(InvoiceRow.id).where(InvoiceRow.user_id == owner.user_id))
        assert stored.all() == []

    async def test_lines_keep_the_price_of_the_day(
        self, session: AsyncSession, invoices: InvoiceService, items: FakeItems, owner: Principal
    ) -> None:
        invoice = await _invoice(session, invoices, items, owner, ("Widget", 1250, 2))
        item_id = invoice.lines[0].item_id
        items.catalog[item_id] = ItemPrice(item_id, "Widget v2", 9999, "EUR")

        again = await invoices.get_visible(session, owner, invoice.id)

        assert (again.lines[0].name, again.lines[0].unit_price, again.total) == ("Widget", 1250, 2500)


class TestGetVisible:
    async def test_the_owner_sees_the_invoice(
        self, session: AsyncSession, invoices: InvoiceService, items: FakeItems, owner: Principal
    ) -> None:
        created = await _invoice(session, invoices, items, owner, ("Widget", 1250, 2), ("Gadget", 499, 1))
        session.expunge_all()  # read it back from the database

        seen = await invoices.get_visible(session, owner, created.id)

        assert seen.id == created.id
        assert seen.total == created.total
        assert seen.lines == created.lines

    async def test_an_admin_sees_anyones_invoice(
        self, session: AsyncSession, invoices: InvoiceService, items: FakeItems, owner: Principal,
        admin: Principal,
    ) -> None:
        created = await _invoice(session, invoices, items, owner)

        assert (await invoices.get_visible(session, admin, created.id)).user_id == owner.user_id

    async def test_someone_else_gets_a_404(
        self, session: AsyncSession, invoices: InvoiceService, items: FakeItems, owner: Principal,
        stranger: Principal,
    ) -> None:
        created = await _invoice(session, invoices, items, owner)

        with pytest.raises(InvoiceNotFound) as caught:
            await invoices.get_visible(session, stranger, created.id)

        assert isinstance(caught.value, NotFound)
        assert caught.value.status == 404
        assert caught.value.code == "not_found"

    async def test_a_missing_invoice_is_the_same_404(
        self, session: AsyncSession, invoices: InvoiceService, admin: Principal
    ) -> None:
        with pytest.raises(InvoiceNotFound):
            await invoices.get_visible(session, admin, uuid.uuid4())


# --- payments: start -----------------------------------------------------------------------------


class TestStart:
    async def test_accepts_a_pending_payment_and_enqueues_one_charge_job(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)

        assert payment.status == PaymentStatus.PENDING.value
        assert (payment.invoice_id, payment.user_id) == (invoice.id, owner.user_id)
        assert (payment.amount, payment.currency) == (invoice.total, invoice.currency)
        assert payment.settled_at is None
        assert (await _payment(session, payment.id))["status"] == "pending"
        jobs = await _outbox(session, JOB, CHARGE_TASK, payment.id)
        assert len(jobs) == 1
        assert jobs[0].name == "billing.charge_payment"
        assert jobs[0].payload == {"payment_id": str(payment.id)}
        assert jobs[0].published_at is None
        assert gateway.ledger.requests == []  # nothing is charged before the job runs

    async def test_a_second_payment_while_one_is_pending_is_refused(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)

        with pytest.raises(PaymentInProgress) as caught:
            await payments.start(session, owner, invoice.id, "tok_visa")

        assert caught.value.status == 409
        assert caught.value.details == {"payment_id": str(payment.id)}

    async def test_a_failed_payment_may_be_retried(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        invoice, first = await _started(session, invoices, payments, items, owner, "tok_chargeDeclined")
        await payments.charge(session, first.id)

        second = await payments.start(session, owner, invoice.id, "tok_visa")

        assert second.id != first.id
        assert second.status == "pending"

    async def test_a_paid_invoice_cannot_be_paid_again(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)
        await payments.charge(session, payment.id)

        with pytest.raises(InvoiceNotPayable) as caught:
            await payments.start(session, owner, invoice.id, "tok_visa")

        assert caught.value.details == {"status": "paid"}

    async def test_a_zero_invoice_has_nothing_to_pay(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        invoice = await _invoice(session, invoices, items, owner, ("Free sample", 0, 3))

        with pytest.raises(NothingToPay):
            await payments.start(session, owner, invoice.id, "tok_visa")

    async def test_someone_elses_invoice_is_a_404(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, stranger: Principal,
    ) -> None:
        invoice = await _invoice(session, invoices, items, owner)

        with pytest.raises(InvoiceNotFound):
            await payments.start(session, stranger, invoice.id, "tok_visa")

    async def test_the_payment_is_visible_to_its_owner_and_admins_only(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, admin: Principal, stranger: Principal,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner)

        assert (await payments.get_visible(session, owner, payment.id)).id == payment.id
        assert (await payments.get_visible(session, admin, payment.id)).id == payment.id
        with pytest.raises(PaymentNotFound):
            await payments.get_visible(session, stranger, payment.id)


# --- payments: the charge job --------------------------------------------------------------------


class TestCharge:
    async def test_success_pays_the_invoice_and_publishes_payment_succeeded(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)

        await payments.charge(session, payment.id)

        stored = await _payment(session, payment.id)
        assert stored["status"] == PaymentStatus.SUCCEEDED.value
        assert stored["failure_code"] is None
        assert stored["settled_at"] is not None
        assert stored["gateway_charge_id"] == gateway.ledger.charges[str(payment.id)].id
        invoice_state = await _invoice_state(session, invoice.id)
        assert invoice_state["status"] == InvoiceStatus.PAID.value
        assert invoice_state["paid_at"] is not None
        events = await _succeeded_events(session, payment.id)
        assert len(events) == 1
        assert events[0].kind == EVENT
        event = PaymentSucceeded.model_validate(events[0].payload)
        assert (event.invoice_id, event.user_id) == (invoice.id, owner.user_id)
        assert (event.amount, event.currency) == (invoice.total, "EUR")
        assert await _failed_events(session, payment.id) == []

    async def test_the_gateway_is_asked_once_with_the_payment_id_as_key(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)

        await payments.charge(session, payment.id)

        assert gateway.ledger.requests == [str(payment.id)]
        assert gateway.ledger.charges[str(payment.id)].params == {
            "amount": invoice.total, "currency": "EUR", "source": "tok_visa",
        }

    async def test_charging_again_makes_no_second_gateway_request(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner)

        await payments.charge(session, payment.id)
        await payments.charge(session, payment.id)

        assert gateway.ledger.requests.count(str(payment.id)) == 1
        assert len(await _succeeded_events(session, payment.id)) == 1

    async def test_a_replay_after_a_lost_transaction_charges_once(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        """The worker charged, then died before committing: the redelivered job reuses the charge."""
        _, payment = await _started(session, invoices, payments, items, owner)
        await session.flush()
        lost = await session.begin_nested()
        await payments.charge(session, payment.id)
        await lost.rollback()
        assert (await _payment(session, payment.id))["status"] == "pending"

        await payments.charge(session, payment.id)

        key = str(payment.id)
        assert gateway.ledger.requests == [key, key]
        assert len(gateway.ledger.successful_charges(key)) == 1
        stored = await _payment(session, payment.id)
        assert stored["status"] == "succeeded"
        assert stored["gateway_charge_id"] == gateway.ledger.charges[key].id
        assert len(await _succeeded_events(session, payment.id)) == 1

    async def test_a_declined_card_fails_the_payment_and_keeps_the_invoice_open(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner, "tok_chargeDeclined")

        await payments.charge(session, payment.id)

        stored = await _payment(session, payment.id)
        assert stored["status"] == PaymentStatus.FAILED.value
        assert stored["failure_code"] == "card_declined"
        assert stored["failure_message"] == "The card was declined."
        assert stored["settled_at"] is not None
        assert (await _invoice_state(session, invoice.id))["status"] == "open"
        events = await _failed_events(session, payment.id)
        assert len(events) == 1
        failed = PaymentFailed.model_validate(events[0].payload)
        assert (failed.invoice_id, failed.user_id, failed.failure_code) == (
            invoice.id, owner.user_id, "card_declined",
        )
        assert await _succeeded_events(session, payment.id) == []

    async def test_a_token_the_gateway_rejects_fails_as_invalid_token(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner, "card_4242424242424242")

        await payments.charge(session, payment.id)

        stored = await _payment(session, payment.id)
        assert (stored["status"], stored["failure_code"]) == ("failed", "invalid_token")
        assert stored["failure_message"] == "The payment token is not valid."
        assert stored["gateway_charge_id"] is None
        assert gateway.ledger.charges == {}
        assert (await _invoice_state(session, invoice.id))["status"] == "open"
        assert [PaymentFailed.model_validate(e.payload).failure_code
                for e in await _failed_events(session, payment.id)] == ["invalid_token"]

    async def test_a_gateway_outage_propagates_and_leaves_the_payment_pending(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner)
        gateway.fail_next(1)

        with pytest.raises(GatewayUnavailable):
            await payments.charge(session, payment.id)
        assert (await _payment(session, payment.id))["status"] == "pending"

        await payments.charge(session, payment.id)  # the retry
        assert (await _payment(session, payment.id))["status"] == "succeeded"

    async def test_an_asynchronous_charge_waits_for_the_webhook(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner, "tok_async")

        await payments.charge(session, payment.id)
        await payments.charge(session, payment.id)  # a redelivery does not ask again

        stored = await _payment(session, payment.id)
        assert stored["status"] == "pending"
        assert stored["gateway_charge_id"] == gateway.ledger.charges[str(payment.id)].id
        assert stored["settled_at"] is None
        assert gateway.ledger.requests == [str(payment.id)]
        assert (await _invoice_state(session, invoice.id))["status"] == "open"
        assert await _succeeded_events(session, payment.id) == []

    async def test_an_unknown_payment_is_ignored(
        self, session: AsyncSession, payments: PaymentService, gateway: FakePaymentGateway
    ) -> None:
        await payments.charge(session, uuid.uuid4())

        assert gateway.ledger.requests == []


class TestGiveUp:
    async def test_a_pending_payment_fails_as_gateway_unavailable(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)

        await payments.give_up(session, payment.id)

        stored = await _payment(session, payment.id)
        assert (stored["status"], stored["failure_code"]) == ("failed", "gateway_unavailable")
        assert stored["failure_message"] == (
            "The payment gateway could not be reached; the payment was not completed."
        )
        assert stored["settled_at"] is not None
        assert (await _invoice_state(session, invoice.id))["status"] == "open"
        assert len(await _failed_events(session, payment.id)) == 1

    async def test_a_settled_payment_is_left_alone(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)
        await payments.charge(session, payment.id)
        before = await _payment(session, payment.id)

        await payments.give_up(session, payment.id)

        assert await _payment(session, payment.id) == before
        assert before["status"] == "succeeded"
        assert (await _invoice_state(session, invoice.id))["status"] == "paid"
        assert await _failed_events(session, payment.id) == []

    async def test_a_failed_payment_keeps_its_first_reason(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner, "tok_expiredCard")
        await payments.charge(session, payment.id)

        await payments.give_up(session, payment.id)

        assert (await _payment(session, payment.id))["failure_code"] == "expired_card"
        assert len(await _failed_events(session, payment.id)) == 1

    async def test_an_unknown_payment_is_ignored(
        self, session: AsyncSession, payments: PaymentService
    ) -> None:
        await payments.give_up(session, uuid.uuid4())


# --- payments: webhooks --------------------------------------------------------------------------


def _event(payment_id: uuid.UUID | str, status: str = SUCCEEDED, event_id: str | None = None) -> GatewayEvent:
    declined = status == DECLINED
    return GatewayEvent(
        id=event_id or f"evt_{uuid.uuid4().hex}",
        type="charge.failed" if declined else "charge.succeeded",
        charge_id=f"ch_{uuid.uuid4().hex[:24]}",
        idempotency_key=str(payment_id),
        status=status,  # type: ignore[arg-type]
        failure_code="card_declined" if declined else None,
        failure_message="The card was declined." if declined else None,
    )


class TestApplyWebhook:
    async def test_settles_an_asynchronous_charge_once_per_event(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner, "tok_async")
        await payments.charge(session, payment.id)
        [event] = gateway.ledger.settle_pending()

        assert await payments.apply_webhook(session, event) is True
        assert await payments.apply_webhook(session, event) is False

        stored = await _payment(session, payment.id)
        assert stored["status"] == "succeeded"
        assert stored["gateway_charge_id"] == event.charge_id
        assert (await _invoice_state(session, invoice.id))["status"] == "paid"
        assert len(await _succeeded_events(session, payment.id)) == 1

    async def test_a_declined_event_fails_the_payment(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner, "tok_asyncDeclined")
        await payments.charge(session, payment.id)
        [event] = gateway.ledger.settle_pending()

        assert await payments.apply_webhook(session, event) is True

        stored = await _payment(session, payment.id)
        assert (stored["status"], stored["failure_code"]) == ("failed", "card_declined")
        assert (await _invoice_state(session, invoice.id))["status"] == "open"
        assert len(await _failed_events(session, payment.id)) == 1

    async def test_an_event_id_longer_than_the_inbox_key_is_still_applied_once(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner, "tok_async")
        await payments.charge(session, payment.id)
        event = _event(payment.id, event_id="evt_" + "x" * 200 + uuid.uuid4().hex)

        assert await payments.apply_webhook(session, event) is True
        assert await payments.apply_webhook(session, event) is False

    async def test_an_unknown_payment_is_ignored(
        self, session: AsyncSession, payments: PaymentService
    ) -> None:
        assert await payments.apply_webhook(session, _event(uuid.uuid4())) is False

    async def test_a_key_that_is_not_a_payment_id_is_ignored(
        self, session: AsyncSession, payments: PaymentService
    ) -> None:
        assert await payments.apply_webhook(session, _event("order-42")) is False

    async def test_an_already_settled_payment_is_left_alone(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)
        await payments.charge(session, payment.id)
        before = await _payment(session, payment.id)

        assert await payments.apply_webhook(session, _event(payment.id, DECLINED)) is False

        assert await _payment(session, payment.id) == before
        assert (await _invoice_state(session, invoice.id))["status"] == "paid"
        assert await _failed_events(session, payment.id) == []
        assert len(await _succeeded_events(session, payment.id)) == 1


# --- payments: receipts --------------------------------------------------------------------------


class TestSendReceipt:
    async def test_mails_the_receipt_to_the_invoice_owner(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, users: FakeUsers, email: InMemoryEmailSender,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)
        await payments.charge(session, payment.id)
        [row] = await _succeeded_events(session, payment.id)
        paid_at = (await _invoice_state(session, invoice.id))["paid_at"]
        session.expunge_all()  # the job runs in a fresh session

        await payments.send_receipt(session, PaymentSucceeded.model_validate(row.payload))

        assert len(email.sent) == 1
        [message] = email.sent
        assert message.to == users.users[owner.user_id].email
        assert message.subject == f"Your Atrium receipt: {format_money(invoice.total, 'EUR')}"
        assert message.subject == "Your Atrium receipt: 29.99 EUR"
        assert message.body.startswith("Hi Ada,\n")
        assert str(invoice.id) in message.body
        assert "  2 x Widget: 25.00 EUR" in message.body.splitlines()
        assert "  1 x Gadget: 4.99 EUR" in message.body.splitlines()
        assert "Total: 29.99 EUR" in message.body
        assert f"received {paid_at:%Y-%m-%d %H:%M} UTC" in message.body

    async def test_a_user_who_is_gone_gets_no_mail(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, users: FakeUsers, email: InMemoryEmailSender,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner)
        await payments.charge(session, payment.id)
        [row] = await _succeeded_events(session, payment.id)
        del users.users[owner.user_id]

        await payments.send_receipt(session, PaymentSucceeded.model_validate(row.payload))

        assert email.sent == []


# --- payments: the reconciler --------------------------------------------------------------------


async def _charged_then_lost(session: AsyncSession, payments: PaymentService, payment_id: uuid.UUID) -> None:
    """The job charged at the gateway, then its worker died before committing anything."""
    await session.flush()
    lost = await session.begin_nested()
    await payments.charge(session, payment_id)
    await lost.rollback()
    assert (await _payment(session, payment_id))["status"] == "pending"


async def _untouched_for(session: AsyncSession, payment_id: uuid.UUID, seconds: float) -> None:
    await session.execute(
        update(PaymentRow).where(PaymentRow.id == payment_id)
        .values(updated_at=utcnow() - timedelta(seconds=seconds))
    )


class TestReconcile:
    async def test_a_charge_the_gateway_made_is_recorded_once_and_the_late_job_does_nothing(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner)
        await _charged_then_lost(session, payments, payment.id)

        assert await payments.reconcile(session, payment.id) == ReconcileOutcome.CHARGED_FOUND

        key = str(payment.id)
        stored = await _payment(session, payment.id)
        assert stored["status"] == "succeeded"
        assert stored["gateway_charge_id"] == gateway.ledger.charges[key].id
        assert (await _invoice_state(session, invoice.id))["status"] == "paid"
        assert len(await _succeeded_events(session, payment.id)) == 1
        assert gateway.ledger.requests == [key]  # looked up, not charged again
        await payments.charge(session, payment.id)  # the message comes back after all
        assert await payments.reconcile(session, payment.id) is None
        assert gateway.ledger.requests == [key]
        assert len(await _succeeded_events(session, payment.id)) == 1

    async def test_a_decline_the_gateway_made_fails_the_payment(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner, "tok_insufficientFunds")
        await _charged_then_lost(session, payments, payment.id)

        assert await payments.reconcile(session, payment.id) == ReconcileOutcome.DECLINED_FOUND

        stored = await _payment(session, payment.id)
        assert (stored["status"], stored["failure_code"]) == ("failed", "insufficient_funds")
        assert (await _invoice_state(session, invoice.id))["status"] == "open"
        assert len(await _failed_events(session, payment.id)) == 1
        assert await _succeeded_events(session, payment.id) == []
        assert gateway.ledger.requests == [str(payment.id)]

    @pytest.mark.parametrize(
        ("token", "outcome", "status", "failure_code"),
        [("tok_visa", ReconcileOutcome.CHARGED_NOW, "succeeded", None),
         ("tok_expiredCard", ReconcileOutcome.DECLINED_NOW, "failed", "expired_card"),
         ("card_4242", ReconcileOutcome.DECLINED_NOW, "failed", "invalid_token")],
        ids=["charged", "declined", "refused"],
    )
    async def test_a_payment_the_gateway_never_saw_is_charged_now_with_its_key(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway, token: str, outcome: ReconcileOutcome, status: str,
        failure_code: str | None,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner, token)

        assert await payments.reconcile(session, payment.id) == outcome

        stored = await _payment(session, payment.id)
        assert (stored["status"], stored["failure_code"]) == (status, failure_code)
        key = str(payment.id)
        assert gateway.ledger.requests == [key]
        await payments.charge(session, payment.id)  # the charge job, late: a no-op
        assert gateway.ledger.requests == [key]
        assert len(gateway.ledger.successful_charges(key)) == (1 if status == "succeeded" else 0)
        settled = await _succeeded_events(session, payment.id) + await _failed_events(session, payment.id)
        assert len(settled) == 1

    async def test_a_charge_still_pending_at_the_gateway_waits_then_settles(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        invoice, payment = await _started(session, invoices, payments, items, owner, "tok_async")
        await _charged_then_lost(session, payments, payment.id)
        await _untouched_for(session, payment.id, 600)

        assert await payments.reconcile(session, payment.id) == ReconcileOutcome.PENDING_AT_GATEWAY
        stored = await _payment(session, payment.id)
        assert stored["status"] == "pending"
        assert stored["gateway_charge_id"] == gateway.ledger.charges[str(payment.id)].id
        # Touched: it is not asked about again until another threshold has passed.
        assert await payments.stale_pending(session, 60, 10) == []

        gateway.ledger.settle_pending()  # its webhook is lost, say
        assert await payments.reconcile(session, payment.id) == ReconcileOutcome.CHARGED_FOUND
        assert (await _invoice_state(session, invoice.id))["status"] == "paid"
        assert len(await _succeeded_events(session, payment.id)) == 1
        assert gateway.ledger.requests == [str(payment.id)]

    async def test_a_pending_charge_the_gateway_forgot_is_left_for_a_person(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner, "tok_async")
        await payments.charge(session, payment.id)
        del gateway.ledger.charges[str(payment.id)]

        assert await payments.reconcile(session, payment.id) == ReconcileOutcome.MISSING_AT_GATEWAY

        assert (await _payment(session, payment.id))["status"] == "pending"
        assert gateway.ledger.requests == [str(payment.id)]  # never charged a second time

    async def test_a_gateway_outage_leaves_the_payment_pending(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner)
        gateway.fail_next(1, lookups=True)

        with pytest.raises(GatewayUnavailable):
            await payments.reconcile(session, payment.id)

        assert (await _payment(session, payment.id))["status"] == "pending"
        assert gateway.ledger.requests == []

    async def test_settled_and_unknown_payments_are_left_alone(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal, gateway: FakePaymentGateway,
    ) -> None:
        _, payment = await _started(session, invoices, payments, items, owner)
        await payments.charge(session, payment.id)
        gateway.fail_next(1, lookups=True)  # a look-up would raise

        assert await payments.reconcile(session, payment.id) is None
        assert await payments.reconcile(session, uuid.uuid4()) is None

    async def test_stale_pending_lists_payments_untouched_past_the_threshold_oldest_first(
        self, session: AsyncSession, invoices: InvoiceService, payments: PaymentService, items: FakeItems,
        owner: Principal,
    ) -> None:
        started = [(await _started(session, invoices, payments, items, owner))[1] for _ in range(4)]
        old, older, fresh, settled = started
        await payments.charge(session, settled.id)
        for payment, seconds in ((old, 120), (older, 300), (settled, 600)):
            await _untouched_for(session, payment.id, seconds)
        mine = {p.id for p in started}

        due = [p for p in await payments.stale_pending(session, 60, 100) if p in mine]

        assert due == [older.id, old.id]
        assert fresh.id not in await payments.stale_pending(session, 60, 100)
        assert len(await payments.stale_pending(session, 60, 1)) == 1


# --- the reconciler against jobs and other workers (committed data: a database of the test's own) --


class HeldGateway(FakePaymentGateway):
    """The fake gateway, slowed a little; ``hold_next`` stops the next call (once the ledger has
    answered) until ``release`` is set, as a charge in flight at the gateway."""

    def __init__(self) -> None:
        super().__init__("webhook-secret")
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self._hold = False

    def hold_next(self) -> None:
        self._hold = True

    async def _after_call(self) -> None:
        await asyncio.sleep(0.005)  # lets other transactions run while this one waits for the gateway
        if self._hold:
            self._hold = False
            self.entered.set()
            await self.release.wait()

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        result = await super().charge(request)
        await self._after_call()
        return result

    async def find_charge(self, idempotency_key: str) -> ChargeResult | None:
        result = await super().find_charge(idempotency_key)
        await self._after_call()
        return result


class _Crash(Exception):
    """The worker died before its commit."""


@dataclass
class Committed:
    sessions: async_sessionmaker[AsyncSession]
    service: PaymentService
    gateway: HeldGateway
    metrics: ReconcileMetrics
    registry: CollectorRegistry

    def run(self, use_case: Callable[[AsyncSession], Awaitable[Any]]) -> asyncio.Task[Any]:
        """``use_case`` in a unit of work of its own (committed at the end), as a task."""

        async def unit() -> Any:
            async with UnitOfWork(self.sessions) as session:
                return await use_case(session)

        return asyncio.create_task(unit())

    def periodic(self, after: float = 60) -> PeriodicContext:
        container = SimpleNamespace(payments=lambda: self.service, reconcile_metrics=lambda: self.metrics,
                                    settings=lambda: SimpleNamespace(billing_reconcile_after_seconds=after))
        return PeriodicContext(container, self.sessions)

    def reconciled(self, outcome: ReconcileOutcome) -> float:
        return self.registry.get_sample_value("atrium_payments_reconciled_total",
                                              {"outcome": outcome.value}) or 0.0

    async def payment(self, payment_id: uuid.UUID) -> dict[str, Any]:
        async with self.sessions() as session:
            return await _payment(session, payment_id)

    async def events(self, payment_id: uuid.UUID) -> list[OutboxMessage]:
        """Its PaymentSucceeded and PaymentFailed rows: one each means one receipt (or one failure)."""
        async with self.sessions() as session:
            succeeded = await _succeeded_events(session, payment_id)
            return succeeded + await _failed_events(session, payment_id)


@pytest.fixture(params=["sqlite", "postgres"])
def private_url(request: pytest.FixtureRequest) -> str:
    """A migrated database of the test's own, for data that must really be committed."""
    return str(request.getfixturevalue(f"private_{request.param}_url"))


@pytest.fixture
async def committed(
    private_url: str, invoices: InvoiceService, users: FakeUsers, email: InMemoryEmailSender,
) -> AsyncIterator[Committed]:
    engine = create_engine(private_url)
    gateway = HeldGateway()
    service = PaymentService(invoices, InvoiceRepository(), PaymentRepository(), Outbox(), Inbox(), gateway,
                             users, email)
    registry = CollectorRegistry()
    try:
        yield Committed(session_factory(engine), service, gateway, ReconcileMetrics(registry), registry)
    finally:
        gateway.release.set()
        await engine.dispose()


async def _committed_payments(
    committed: Committed, invoices: InvoiceService, items: FakeItems, owner: Principal, *tokens: str,
    untouched_for: float = 0,
) -> list[Payment]:
    started = []
    for token in tokens:
        started.append(await committed.run(
            lambda s, token=token: _started(s, invoices, committed.service, items, owner, token)
        ))
    if untouched_for:
        for _, payment in started:
            await committed.run(lambda s, p=payment: _untouched_for(s, p.id, untouched_for))
    return [payment for _, payment in started]


async def _crashed_charge(committed: Committed, payment_id: uuid.UUID) -> None:
    """The charge job reached the gateway, then its worker died: nothing of it was committed."""

    async def charge_then_die(session: AsyncSession) -> None:
        await committed.service.charge(session, payment_id)
        raise _Crash

    with pytest.raises(_Crash):
        await committed.run(charge_then_die)


class TestReconcileConcurrently:
    async def test_a_job_in_flight_keeps_the_reconciler_off_and_charges_once(
        self, committed: Committed, invoices: InvoiceService, items: FakeItems, owner: Principal,
    ) -> None:
        [payment] = await _committed_payments(committed, invoices, items, owner, "tok_visa")
        committed.gateway.hold_next()
        job = committed.run(lambda s: committed.service.charge(s, payment.id))
        await asyncio.wait_for(committed.gateway.entered.wait(), 10)  # charged, not yet committed

        reconciler = committed.run(lambda s: committed.service.reconcile(s, payment.id))
        await asyncio.sleep(0.3)  # PostgreSQL: it skips the locked payment; SQLite: it waits its turn
        committed.gateway.release.set()
        _, outcome = await asyncio.wait_for(asyncio.gather(job, reconciler), 20)

        assert outcome is None
        assert (await committed.payment(payment.id))["status"] == "succeeded"
        assert committed.gateway.ledger.requests == [str(payment.id)]
        assert len(await committed.events(payment.id)) == 1

    async def test_a_job_arriving_while_the_reconciler_works_does_nothing(
        self, committed: Committed, invoices: InvoiceService, items: FakeItems, owner: Principal,
    ) -> None:
        [payment] = await _committed_payments(committed, invoices, items, owner, "tok_visa")
        committed.gateway.hold_next()
        reconciler = committed.run(lambda s: committed.service.reconcile(s, payment.id))
        await asyncio.wait_for(committed.gateway.entered.wait(), 10)  # looked up: never charged

        job = committed.run(lambda s: committed.service.charge(s, payment.id))
        await asyncio.sleep(0.3)  # the job waits for the payment's locks (SQLite: for its turn)
        committed.gateway.release.set()
        outcome, _ = await asyncio.wait_for(asyncio.gather(reconciler, job), 20)

        assert outcome == ReconcileOutcome.CHARGED_NOW
        assert (await committed.payment(payment.id))["status"] == "succeeded"
        assert committed.gateway.ledger.requests == [str(payment.id)]
        assert len(committed.gateway.ledger.successful_charges(str(payment.id))) == 1
        assert len(await committed.events(payment.id)) == 1

    async def test_two_workers_reconciling_at_once_finish_each_payment_once_and_count_it(
        self, committed: Committed, invoices: InvoiceService, items: FakeItems, owner: Principal,
    ) -> None:
        tokens = ["tok_visa"] * 3 + ["tok_chargeDeclined"] * 2 + ["tok_mastercard"] * 3 + ["tok_expiredCard"]
        payments = await _committed_payments(committed, invoices, items, owner, *tokens, untouched_for=120)
        for payment in payments[:5]:  # charged or declined at the gateway by a job that then died
            await _crashed_charge(committed, payment.id)
        [fresh] = await _committed_payments(committed, invoices, items, owner, "tok_visa")

        await asyncio.wait_for(asyncio.gather(reconcile_payments.fn(committed.periodic()),
                                              reconcile_payments.fn(committed.periodic())), 30)

        states = [(await committed.payment(p.id))["status"] for p in payments]
        assert states == ["succeeded"] * 3 + ["failed"] * 2 + ["succeeded"] * 3 + ["failed"]
        for payment in payments:
            assert committed.gateway.ledger.requests.count(str(payment.id)) == 1
            assert len(await committed.events(payment.id)) == 1
        assert (await committed.payment(fresh.id))["status"] == "pending"  # not past the threshold
        assert str(fresh.id) not in committed.gateway.ledger.requests
        counts = {o: committed.reconciled(o) for o in ReconcileOutcome}
        assert counts == {ReconcileOutcome.CHARGED_FOUND: 3, ReconcileOutcome.DECLINED_FOUND: 2,
                          ReconcileOutcome.CHARGED_NOW: 3, ReconcileOutcome.DECLINED_NOW: 1,
                          ReconcileOutcome.PENDING_AT_GATEWAY: 0, ReconcileOutcome.MISSING_AT_GATEWAY: 0,
                          ReconcileOutcome.GATEWAY_UNAVAILABLE: 0}

        await reconcile_payments.fn(committed.periodic())  # nothing left to do
        assert {o: committed.reconciled(o) for o in ReconcileOutcome} == counts

    async def test_an_outage_ends_the_run_and_the_next_run_finishes_the_payments(
        self, committed: Committed, invoices: InvoiceService, items: FakeItems, owner: Principal,
    ) -> None:
        payments = await _committed_payments(committed, invoices, items, owner, "tok_visa", "tok_visa",
                                              untouched_for=120)
        committed.gateway.fail_next(1, lookups=True)

        await reconcile_payments.fn(committed.periodic())

        assert committed.reconciled(ReconcileOutcome.GATEWAY_UNAVAILABLE) == 1
        assert [(await committed.payment(p.id))["status"] for p in payments] == ["pending", "pending"]
        await reconcile_payments.fn(committed.periodic())
        assert [(await committed.payment(p.id))["status"] for p in payments] == ["succeeded", "succeeded"]
        assert committed.reconciled(ReconcileOutcome.CHARGED_NOW) == 2
