"""Payment use cases: accepted in a request, charged by a job, settled by the job or a webhook.

Never commits: the request edge or the job's unit of work does.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from loguru import logger
from sqlalchemy.ext.asyncio import AsyncSession

from core.db.base import utcnow
from core.email import EmailMessage, EmailSender
from core.messaging.outbox import Inbox, Outbox
from core.security import Principal
from modules.billing.adapters.gateway import (
    DECLINED,
    PENDING,
    SUCCEEDED,
    ChargeRequest,
    ChargeResult,
    GatewayEvent,
    GatewayRejected,
    PaymentGateway,
)
from modules.billing.domain import (
    InvoiceNotPayable,
    InvoiceStatus,
    NothingToPay,
    PaymentInProgress,
    PaymentNotFound,
    PaymentStatus,
    ReconcileOutcome,
    invoice_transition,
    payment_transition,
    receipt_email,
)
from modules.billing.models import InvoiceRow, PaymentRow
from modules.billing.public import PaymentFailed, PaymentSucceeded
from modules.billing.repository import InvoiceRepository, PaymentRepository
from modules.billing.schemas import ChargePayment
from modules.billing.service.invoices import InvoiceService, to_invoice, visible_to
from modules.users.public import UsersFacade

CHARGE_TASK = "billing.charge_payment"
_FOUND = {SUCCEEDED: ReconcileOutcome.CHARGED_FOUND, DECLINED: ReconcileOutcome.DECLINED_FOUND,
          PENDING: ReconcileOutcome.PENDING_AT_GATEWAY}
_NOW = {SUCCEEDED: ReconcileOutcome.CHARGED_NOW, DECLINED: ReconcileOutcome.DECLINED_NOW,
        PENDING: ReconcileOutcome.PENDING_AT_GATEWAY}


@dataclass(frozen=True, slots=True)
class Payment:
    id: uuid.UUID
    invoice_id: uuid.UUID
    user_id: uuid.UUID
    status: str
    amount: int
    currency: str
    failure_code: str | None
    failure_message: str | None
    created_at: datetime
    updated_at: datetime
    settled_at: datetime | None


def to_payment(row: PaymentRow) -> Payment:
    return Payment(row.id, row.invoice_id, row.user_id, row.status, row.amount, row.currency,
                   row.failure_code, row.failure_message, row.created_at, row.updated_at, row.settled_at)


class PaymentService:
    """Locks are always taken invoice first, then payment, so concurrent use cases cannot deadlock."""

    def __init__(self, invoices: InvoiceService, invoice_rows: InvoiceRepository,
                 payments: PaymentRepository, outbox: Outbox, inbox: Inbox, gateway: PaymentGateway,
                 users: UsersFacade, email: EmailSender) -> None:
        self._invoice_service = invoices
        self._invoices = invoice_rows
        self._payments = payments
        self._outbox = outbox
        self._inbox = inbox
        self._gateway = gateway
        self._users = users
        self._email = email

    async def start(self, session: AsyncSession, principal: Principal, invoice_id: uuid.UUID,
                    token: str) -> Payment:
        """Accept a payment of the whole invoice; the charge itself runs in a job after commit."""
        invoice = await self._invoice_service.owned_row(
            session, principal, invoice_id, for_update=True
        )
        if invoice.status != InvoiceStatus.OPEN.value:
            raise InvoiceNotPayable(invoice.status)
        if invoice.total <= 0:
            raise NothingToPay()
        active = await self._payments.one_or_none(session, self._payments.active_of_invoice(invoice.id))
        if active is not None:
            raise PaymentInProgress(active.id)
        row = PaymentRow(invoice_id=invoice.id, user_id=invoice.user_id, amount=invoice.total,
                         currency=invoice.currency, status=PaymentStatus.PENDING.value, token=token)
        await self._payments.add(session, row)
        self._outbox.enqueue(session, CHARGE_TASK, ChargePayment(payment_id=row.id))
        return to_payment(row)

    async def get_visible(
        self, session: AsyncSession, principal: Principal, payment_id: uuid.UUID
    ) -> Payment:
        """A payment of the caller (any payment for an admin); 404 for anyone else's."""
        row = await self._payments.get(session, payment_id)
        if row is None or not visible_to(principal, row.user_id):
            raise PaymentNotFound()
        return to_payment(row)

    async def of_invoice(
        self, session: AsyncSession, principal: Principal, invoice_id: uuid.UUID
    ) -> list[Payment]:
        """Every payment attempt on an invoice the caller may see, oldest first."""
        invoice = await self._invoice_service.owned_row(session, principal, invoice_id)
        rows = await self._payments.all(session, self._payments.of_invoice(invoice.id))
        return [to_payment(r) for r in rows]

    async def charge(self, session: AsyncSession, payment_id: uuid.UUID) -> None:
        """Job body: charge a pending payment at the gateway and record the outcome.

        The gateway call carries the payment id as its idempotency key, so running this again
        (a redelivered message, a worker killed after the charge) returns the first charge instead
        of making a second one. ``GatewayUnavailable`` propagates: the job is retried.
        """
        locked = await self._lock(session, payment_id)
        if locked is None:
            return
        _, payment = locked
        if payment.status != PaymentStatus.PENDING.value or payment.gateway_charge_id is not None:
            return  # settled already, or waiting for the gateway's webhook
        await self._charge_locked(session, payment)

    async def give_up(self, session: AsyncSession, payment_id: uuid.UUID) -> None:
        """After the last retry: the payment fails with a reason the user can read."""
        locked = await self._lock(session, payment_id)
        if locked is not None and locked[1].status == PaymentStatus.PENDING.value:
            await self._settle(session, locked[1], ChargeResult(
                DECLINED, locked[1].gateway_charge_id, "gateway_unavailable",
                "The payment gateway could not be reached; the payment was not completed.",
            ))

    async def apply_webhook(self, session: AsyncSession, event: GatewayEvent) -> bool:
        """Record the late result of a charge; each gateway event is applied once."""
        message_id = event.id if len(event.id) <= 64 else hashlib.sha256(event.id.encode()).hexdigest()
        if not await self._inbox.claim(session, message_id, "billing.gateway_webhook"):
            return False
        try:
            payment_id = uuid.UUID(event.idempotency_key)
        except ValueError:
            logger.warning("gateway webhook {} names no payment of ours", event.id)
            return False
        locked = await self._lock(session, payment_id)
        if locked is None:
            return False
        if locked[1].status != PaymentStatus.PENDING.value:
            if event.status == SUCCEEDED and locked[1].status != PaymentStatus.SUCCEEDED.value:
                # Money was taken for a payment we had already failed (e.g. given up after
                # timeouts): never drop that fact; it needs a refund or a manual settlement.
                logger.error("reconcile: gateway charge {} succeeded for payment {}, which is {}",
                             event.charge_id, payment_id, locked[1].status)
            return False
        await self._settle(session, locked[1], ChargeResult(
            event.status, event.charge_id, event.failure_code, event.failure_message
        ))
        return True

    async def stale_pending(self, session: AsyncSession, older_than: float, limit: int) -> list[uuid.UUID]:
        """Ids of payments pending and untouched for ``older_than`` seconds, the longest waiting first."""
        cutoff = utcnow() - timedelta(seconds=older_than)
        return list((await session.scalars(self._payments.pending_since(cutoff, limit))).all())

    async def reconcile(self, session: AsyncSession, payment_id: uuid.UUID) -> ReconcileOutcome | None:
        """Finish a payment left pending (its message lost, its worker killed mid-charge): ask the
        gateway by the payment's idempotency key and record what it did, or charge now with that key.

        Settles through the charge job's own code, so a job that runs later finds the payment settled
        and does nothing. None when there is nothing to do: the payment is settled already, or a job
        (or another worker's reconciler) holds its locks right now and finishes it. ``GatewayError``
        from the look-up propagates and leaves the payment pending.
        """
        peek = await self._payments.get(session, payment_id)
        if peek is None or peek.status != PaymentStatus.PENDING.value:
            return None
        # The module's lock order (invoice, then payment), but skipping what someone else holds.
        invoice = await self._invoices.one_or_none(
            session, self._invoices.lock_unless_busy(peek.invoice_id)
        )
        if invoice is None:
            return None
        payment = await self._payments.one_or_none(session, self._payments.lock_unless_busy(payment_id))
        if payment is None or payment.status != PaymentStatus.PENDING.value:
            return None
        found = await self._gateway.find_charge(str(payment.id))
        if found is None and payment.gateway_charge_id is not None:
            # It answered "pending" with this charge once; charging again could take the money twice.
            logger.error("reconcile: the gateway knows no charge for payment {}, which it answered with "
                         "charge {}; left pending for a person to settle",
                         payment.id, payment.gateway_charge_id)
            return ReconcileOutcome.MISSING_AT_GATEWAY
        if found is None:
            return _NOW[(await self._charge_locked(session, payment)).status]
        await self._settle(session, payment, found)
        return _FOUND[found.status]

    async def send_receipt(self, session: AsyncSession, event: PaymentSucceeded) -> None:
        """Job body: mail the receipt of a successful payment to the invoice's owner."""
        user = await self._users.get_user(session, event.user_id)
        invoice = await self._invoices.get(session, event.invoice_id)
        if user is None or invoice is None:
            logger.warning("receipt for payment {} skipped: user or invoice is gone", event.payment_id)
            return
        lines = (await session.execute(self._invoices.lines([invoice.id]))).scalars().all()
        subject, body = receipt_email(user.full_name, invoice.id, to_invoice(invoice, lines).lines,
                                      event.amount, event.currency, invoice.paid_at or event.occurred_at)
        # Keyed by the payment: a receipt sent again after a crash is the same message (core.email).
        await self._email.send(EmailMessage(to=user.email, subject=subject, body=body,
                                            key=f"billing.receipt.{event.payment_id}"))

    async def _lock(
        self, session: AsyncSession, payment_id: uuid.UUID
    ) -> tuple[InvoiceRow, PaymentRow] | None:
        """Lock the payment's invoice, then the payment (the one lock order of this module)."""
        peek = await self._payments.get(session, payment_id)
        if peek is None:
            logger.warning("payment {} does not exist", payment_id)
            return None
        invoice = await self._invoices.get(session, peek.invoice_id, for_update=True)
        payment = await self._payments.get(session, payment_id, for_update=True)
        if invoice is None or payment is None:
            return None
        return invoice, payment

    async def _charge_locked(self, session: AsyncSession, payment: PaymentRow) -> ChargeResult:
        """Charge a locked pending payment with its id as the idempotency key and settle it: the one
        way a payment is charged, by its job or by the reconciler."""
        request = ChargeRequest(
            idempotency_key=str(payment.id), amount=payment.amount, currency=payment.currency,
            token=payment.token, description=f"Atrium invoice {payment.invoice_id}",
            metadata={"payment_id": str(payment.id), "invoice_id": str(payment.invoice_id)},
        )
        try:
            result = await self._gateway.charge(request)
        except GatewayRejected as exc:
            result = ChargeResult(DECLINED, None, exc.code, exc.message)
        await self._settle(session, payment, result)
        return result

    async def _settle(self, session: AsyncSession, payment: PaymentRow, result: ChargeResult) -> None:
        """Record a charge's result on a payment locked (with its invoice) by this transaction."""
        now = utcnow()
        payment.updated_at = now
        if result.status == PENDING:  # the gateway answers later, by webhook
            payment.gateway_charge_id = result.charge_id
            await session.flush()
            return
        payment.gateway_charge_id = result.charge_id or payment.gateway_charge_id
        payment.settled_at = now
        if result.status == SUCCEEDED:
            payment.status = payment_transition(PaymentStatus(payment.status), PaymentStatus.SUCCEEDED).value
            invoice = await self._invoices.get(session, payment.invoice_id, for_update=True)
            assert invoice is not None
            if invoice.status == InvoiceStatus.OPEN.value:
                invoice.status = invoice_transition(InvoiceStatus.OPEN, InvoiceStatus.PAID).value
                invoice.paid_at = invoice.updated_at = now
            else:  # cannot happen while void and pay both lock the invoice; never lose the fact
                logger.error("payment {} succeeded on a {} invoice {}",
                             payment.id, invoice.status, invoice.id)
            self._outbox.publish(session, PaymentSucceeded(
                payment_id=payment.id, invoice_id=payment.invoice_id, user_id=payment.user_id,
                amount=payment.amount, currency=payment.currency,
            ))
        else:
            payment.status = payment_transition(PaymentStatus(payment.status), PaymentStatus.FAILED).value
            payment.failure_code = (result.failure_code or "declined")[:64]
            payment.failure_message = (result.failure_message or "The payment was declined.")[:500]
            self._outbox.publish(session, PaymentFailed(
                payment_id=payment.id, invoice_id=payment.invoice_id, user_id=payment.user_id,
                failure_code=payment.failure_code,
            ))
        await session.flush()
