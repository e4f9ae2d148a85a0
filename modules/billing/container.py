"""The billing module's providers; items and users are reached through their facades.

Billing owns the payment gateway port: which adapter serves it (the in-process fake or the HTTP
gateway) is chosen here from ``settings.payments_backend``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from dependency_injector import containers, providers
from prometheus_client import CollectorRegistry

from core.edge.idempotency import IdempotencyStore
from core.edge.pagination import CursorCodec
from core.email import EmailSender
from core.messaging.outbox import Inbox, Outbox
from modules.billing.adapters.gateway import FakePaymentGateway, PaymentGateway
from modules.billing.metrics import ReconcileMetrics
from modules.billing.repository import InvoiceRepository, PaymentRepository
from modules.billing.service.invoices import InvoiceService
from modules.billing.service.payments import PaymentService
from modules.items.public import ItemsFacade
from modules.users.public import UsersFacade


def _http_gateway(**options: Any) -> PaymentGateway:
    from modules.billing.adapters.http import HttpPaymentGateway  # httpx is only needed when chosen

    return HttpPaymentGateway(**options)


async def _closing_gateway(gateway: PaymentGateway) -> AsyncIterator[PaymentGateway]:
    try:
        yield gateway
    finally:
        await gateway.aclose()


class BillingContainer(containers.DeclarativeContainer):
    settings: providers.Dependency[Any] = providers.Dependency()  # config.Settings, not imported by modules
    outbox: providers.Dependency[Outbox] = providers.Dependency()
    inbox: providers.Dependency[Inbox] = providers.Dependency()
    cursors: providers.Dependency[CursorCodec] = providers.Dependency()
    idempotency: providers.Dependency[IdempotencyStore] = providers.Dependency()
    email_sender: providers.Dependency[EmailSender] = providers.Dependency()
    items_facade: providers.Dependency[ItemsFacade] = providers.Dependency()
    users_facade: providers.Dependency[UsersFacade] = providers.Dependency()
    metrics_registry: providers.Dependency[CollectorRegistry] = providers.Dependency()

    payment_gateway = providers.Selector(
        settings.provided.payments_backend,
        fake=providers.Singleton(FakePaymentGateway, settings.provided.payments_webhook_secret),
        http=providers.Singleton(
            _http_gateway,
            base_url=settings.provided.payments_url,
            api_key=settings.provided.payments_api_key,
            webhook_secret=settings.provided.payments_webhook_secret,
            timeout=settings.provided.payments_timeout,
            connect_timeout=settings.provided.payments_connect_timeout,
            max_attempts=settings.provided.payments_max_attempts,
        ),
    )
    payments_lifecycle = providers.Resource(_closing_gateway, payment_gateway)

    invoice_repository = providers.Singleton(InvoiceRepository)
    payment_repository = providers.Singleton(PaymentRepository)
    invoices = providers.Singleton(
        InvoiceService, invoice_repository, payment_repository, items_facade, cursors
    )
    payments = providers.Singleton(
        PaymentService, invoices, invoice_repository, payment_repository, outbox, inbox, payment_gateway,
        users_facade, email_sender,
    )
    reconcile_metrics = providers.Singleton(ReconcileMetrics, metrics_registry)
