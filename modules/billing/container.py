"""The billing module's providers; items and users are reached through their facades."""

from __future__ import annotations

from dependency_injector import containers, providers

from modules.billing.repository import InvoiceRepository, PaymentRepository
from modules.billing.service.invoices import InvoiceService
from modules.billing.service.payments import PaymentService


class BillingContainer(containers.DeclarativeContainer):
    outbox = providers.Dependency()
    inbox = providers.Dependency()
    cursors = providers.Dependency()
    idempotency = providers.Dependency()
    payment_gateway = providers.Dependency()
    email_sender = providers.Dependency()
    items_facade = providers.Dependency()
    users_facade = providers.Dependency()

    invoice_repository = providers.Singleton(InvoiceRepository)
    payment_repository = providers.Singleton(PaymentRepository)
    invoices = providers.Singleton(
        InvoiceService, invoice_repository, payment_repository, items_facade, cursors
    )
    payments = providers.Singleton(
        PaymentService, invoices, invoice_repository, payment_repository, outbox, inbox, payment_gateway,
        users_facade, email_sender,
    )
