"""The billing module's public face: the events it publishes."""

from __future__ import annotations

import uuid

from core.messaging.events import IntegrationEvent


class PaymentSucceeded(IntegrationEvent):
    """A payment was charged and its invoice is paid (a receipt email follows)."""

    name = "billing.PaymentSucceeded"

    payment_id: uuid.UUID
    invoice_id: uuid.UUID
    user_id: uuid.UUID
    amount: int
    currency: str


class PaymentFailed(IntegrationEvent):
    """A payment was declined or could not be completed; its invoice stays open."""

    name = "billing.PaymentFailed"

    payment_id: uuid.UUID
    invoice_id: uuid.UUID
    user_id: uuid.UUID
    failure_code: str
