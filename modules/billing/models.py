"""Tables owned by the billing module.

Item and user ids are plain columns, not foreign keys: those tables belong to other modules,
which may live in another schema (or database) one day. Lines copy the item's name and price as
they were when the invoice was made.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from core.db.base import Base, new_id, utcnow

_ACTIVE = "status IN ('pending', 'succeeded')"
_PENDING = "status = 'pending'"


class InvoiceRow(Base):
    __tablename__ = "invoices"
    __table_args__ = (Index("ix_invoices_user_id", "user_id", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID]
    status: Mapped[str] = mapped_column(String(8))
    currency: Mapped[str] = mapped_column(String(3))
    total: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    paid_at: Mapped[datetime | None] = mapped_column(default=None)
    voided_at: Mapped[datetime | None] = mapped_column(default=None)


class InvoiceLineRow(Base):
    __tablename__ = "invoice_lines"

    invoice_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("invoices.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[uuid.UUID]
    name: Mapped[str] = mapped_column(String(200))
    unit_price: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int]
    amount: Mapped[int] = mapped_column(BigInteger)


class PaymentRow(Base):
    __tablename__ = "payments"
    __table_args__ = (
        Index("ix_payments_invoice_id", "invoice_id", "id"),
        # At most one payment per invoice may be pending or succeeded: the service checks this
        # under a lock on the invoice, and the database refuses a second one regardless.
        Index("uq_payments_active_invoice", "invoice_id", unique=True,
              postgresql_where=text(_ACTIVE), sqlite_where=text(_ACTIVE)),
        # The reconciler's question, every few seconds: which payments have been pending a while.
        Index("ix_payments_pending", "updated_at",
              postgresql_where=text(_PENDING), sqlite_where=text(_PENDING)),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id)
    invoice_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("invoices.id", ondelete="CASCADE"))
    user_id: Mapped[uuid.UUID]
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(16))
    # The single-use token from the client's card form; never returned by the API.
    token: Mapped[str] = mapped_column(String(255))
    gateway_charge_id: Mapped[str | None] = mapped_column(String(64), default=None)
    failure_code: Mapped[str | None] = mapped_column(String(64), default=None)
    failure_message: Mapped[str | None] = mapped_column(String(500), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    settled_at: Mapped[datetime | None] = mapped_column(default=None)
