"""Invoice use cases. Never commits: the request edge does."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from core.db.base import utcnow
from core.edge.pagination import CursorCodec, InvalidCursor
from core.security import Principal
from modules.billing.domain import (
    InvoiceNotFound,
    InvoiceStatus,
    Line,
    PaymentInProgress,
    invoice_transition,
    price_lines,
)
from modules.billing.models import InvoiceLineRow, InvoiceRow
from modules.billing.repository import InvoiceRepository, PaymentRepository
from modules.items.public import ItemsFacade


@dataclass(frozen=True, slots=True)
class Invoice:
    id: uuid.UUID
    user_id: uuid.UUID
    status: str
    currency: str
    total: int
    lines: tuple[Line, ...]
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None
    voided_at: datetime | None


def to_invoice(row: InvoiceRow, lines: Sequence[InvoiceLineRow]) -> Invoice:
    return Invoice(
        row.id, row.user_id, row.status, row.currency, row.total,
        tuple(Line(line.item_id, line.name, line.unit_price, line.quantity) for line in lines),
        row.created_at, row.updated_at, row.paid_at, row.voided_at,
    )


def visible_to(principal: Principal, owner_id: uuid.UUID) -> bool:
    """Users see their own billing records; admins see everyone's."""
    return principal.is_admin or principal.user_id == owner_id


class InvoiceService:
    def __init__(self, invoices: InvoiceRepository, payments: PaymentRepository, items: ItemsFacade,
                 cursors: CursorCodec) -> None:
        self._invoices = invoices
        self._payments = payments
        self._items = items
        self._cursors = cursors

    async def create(self, session: AsyncSession, principal: Principal,
                     requested: Sequence[tuple[uuid.UUID, int]]) -> Invoice:
        """Open an invoice for the caller, priced from the catalog as it is now (one look-up)."""
        prices = await self._items.prices(session, {item_id for item_id, _ in requested})
        priced = price_lines(requested, prices)
        row = InvoiceRow(user_id=principal.user_id, status=InvoiceStatus.OPEN.value,
                         currency=priced.currency, total=priced.total)
        await self._invoices.add(session, row)
        lines = [
            InvoiceLineRow(invoice_id=row.id, position=n, item_id=line.item_id, name=line.name,
                           unit_price=line.unit_price, quantity=line.quantity, amount=line.amount)
            for n, line in enumerate(priced.lines, start=1)
        ]
        session.add_all(lines)
        await session.flush()
        return to_invoice(row, lines)

    async def get_visible(
        self, session: AsyncSession, principal: Principal, invoice_id: uuid.UUID
    ) -> Invoice:
        """An invoice of the caller (any invoice for an admin); 404 for anyone else's."""
        row = await self.owned_row(session, principal, invoice_id)
        return (await self._with_lines(session, [row]))[0]

    async def owned_row(self, session: AsyncSession, principal: Principal, invoice_id: uuid.UUID,
                        *, for_update: bool = False) -> InvoiceRow:
        row = await self._invoices.get(session, invoice_id, for_update=for_update)
        if row is None or not visible_to(principal, row.user_id):
            raise InvoiceNotFound()
        return row

    async def list(self, session: AsyncSession, principal: Principal, limit: int, cursor: str | None,
                   status: str | None) -> tuple[list[Invoice], str | None]:
        """A page of the caller's invoices (everyone's for an admin), newest first."""
        criteria = {"status": status, "scope": "all" if principal.is_admin else str(principal.user_id)}
        before = None
        if cursor is not None:
            position = self._cursors.decode(cursor, criteria)
            try:
                before = uuid.UUID(str(position.get("id")))
            except ValueError:
                raise InvalidCursor() from None
        stmt = self._invoices.page(user_id=None if principal.is_admin else principal.user_id,
                                   before=before, limit=limit, status=status)
        rows = await self._invoices.all(session, stmt)
        page = await self._with_lines(session, rows[:limit])
        next_cursor = None
        if len(rows) > limit:
            next_cursor = self._cursors.encode({"id": str(rows[limit - 1].id)}, criteria)
        return page, next_cursor

    async def void(self, session: AsyncSession, principal: Principal, invoice_id: uuid.UUID) -> Invoice:
        """Cancel an open invoice; refused (409) once paid or while a payment is in progress."""
        row = await self.owned_row(session, principal, invoice_id, for_update=True)
        active = await self._payments.one_or_none(session, self._payments.active_of_invoice(row.id))
        if active is not None and row.status == InvoiceStatus.OPEN.value:
            raise PaymentInProgress(active.id)
        row.status = invoice_transition(InvoiceStatus(row.status), InvoiceStatus.VOID).value
        row.voided_at = row.updated_at = utcnow()
        await session.flush()
        return (await self._with_lines(session, [row]))[0]

    async def _with_lines(
        self, session: AsyncSession, rows: Sequence[InvoiceRow]
    ) -> builtins.list[Invoice]:  # `list` is a method of this class here
        """Attach the lines of all ``rows`` with one query."""
        if not rows:
            return []
        by_invoice: dict[uuid.UUID, list[InvoiceLineRow]] = {row.id: [] for row in rows}
        for line in (await session.execute(self._invoices.lines(by_invoice))).scalars():
            by_invoice[line.invoice_id].append(line)
        return [to_invoice(row, by_invoice[row.id]) for row in rows]


