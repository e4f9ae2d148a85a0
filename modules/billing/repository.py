"""Statements over the billing tables."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime

from sqlalchemy import Select, select

from core.db.repository import Repository
from modules.billing.domain import PaymentStatus
from modules.billing.models import InvoiceLineRow, InvoiceRow, PaymentRow


class InvoiceRepository(Repository[InvoiceRow]):
    model = InvoiceRow

    def page(self, *, user_id: uuid.UUID | None, before: uuid.UUID | None, limit: int,
             status: str | None = None) -> Select[InvoiceRow]:
        """Newest first (UUIDv7 ids order by creation); ``limit + 1`` rows tell if more exist.

        ``user_id=None`` lists everyone's invoices (admins).
        """
        stmt = self.select()
        if user_id is not None:
            stmt = stmt.where(InvoiceRow.user_id == user_id)
        if before is not None:
            stmt = stmt.where(InvoiceRow.id < before)
        if status is not None:
            stmt = stmt.where(InvoiceRow.status == status)
        return stmt.order_by(InvoiceRow.id.desc()).limit(limit + 1)

    def lock_unless_busy(self, invoice_id: uuid.UUID) -> Select[InvoiceRow]:
        """The invoice, locked; no row while another transaction holds it (``SKIP LOCKED``)."""
        return (self.select().where(InvoiceRow.id == invoice_id).with_for_update(skip_locked=True)
                .execution_options(populate_existing=True))

    def lines(self, invoice_ids: Collection[uuid.UUID]) -> Select[InvoiceLineRow]:
        return (
            select(InvoiceLineRow)
            .where(InvoiceLineRow.invoice_id.in_(list(invoice_ids)))
            .order_by(InvoiceLineRow.invoice_id, InvoiceLineRow.position)
        )


class PaymentRepository(Repository[PaymentRow]):
    model = PaymentRow

    def of_invoice(self, invoice_id: uuid.UUID) -> Select[PaymentRow]:
        return self.select().where(PaymentRow.invoice_id == invoice_id).order_by(PaymentRow.id)

    def active_of_invoice(self, invoice_id: uuid.UUID) -> Select[PaymentRow]:
        """The invoice's pending or succeeded payment, if any (there is at most one)."""
        return self.select().where(
            PaymentRow.invoice_id == invoice_id,
            PaymentRow.status.in_([PaymentStatus.PENDING.value, PaymentStatus.SUCCEEDED.value]),
        )

    def lock_unless_busy(self, payment_id: uuid.UUID) -> Select[PaymentRow]:
        """The payment, locked; no row while another transaction holds it (``SKIP LOCKED``)."""
        return (self.select().where(PaymentRow.id == payment_id).with_for_update(skip_locked=True)
                .execution_options(populate_existing=True))

    @staticmethod
    def pending_since(untouched_since: datetime, limit: int) -> Select[uuid.UUID]:
        """Ids of payments pending and unchanged since ``untouched_since``, the longest waiting first."""
        return (
            select(PaymentRow.id)
            .where(PaymentRow.status == PaymentStatus.PENDING.value, PaymentRow.updated_at < untouched_since)
            .order_by(PaymentRow.updated_at)
            .limit(limit)
        )
