"""HTTP models of the billing API, and the payloads of its jobs.

What a client sends stays inside the columns it reaches (``core.edge.types``): a quantity is an
``Integer`` column, a payment token a ``String(255)`` of a closed alphabet.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from core.edge.types import JSON_INTEGER, Int32
from modules.billing.domain import MAX_LINES, MAX_QUANTITY

# The domain's MAX_QUANTITY is far inside the column (integer); Int32 states the column.
Quantity = Annotated[Int32, Field(ge=1, le=MAX_QUANTITY, examples=[1]), JSON_INTEGER]


class LineCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: uuid.UUID
    quantity: Quantity


class InvoiceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lines: list[LineCreate] = Field(min_length=1, max_length=MAX_LINES)


class LineRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    item_id: uuid.UUID
    name: str
    unit_price: int
    quantity: int
    amount: int


class InvoiceRead(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    status: Literal["open", "paid", "void"]
    currency: str
    total: int = Field(description="integer minor units")
    lines: list[LineRead]
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None
    voided_at: datetime | None


class InvoicePage(BaseModel):
    invoices: list[InvoiceRead]
    next_cursor: str | None


# Gateways issue tokens of letters, digits, '_' and '-'; anything else cannot be one. The pattern is
# stricter than ONE_LINE (no control character can match), and 255 is the column's length.
PaymentToken = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-]+$"),
                         Field(examples=["tok_visa"])]


class PaymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payment_token: PaymentToken


class PaymentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    invoice_id: uuid.UUID
    user_id: uuid.UUID
    status: Literal["pending", "succeeded", "failed"]
    amount: int = Field(description="integer minor units")
    currency: str
    failure_code: str | None
    failure_message: str | None
    created_at: datetime
    updated_at: datetime
    settled_at: datetime | None


class PaymentList(BaseModel):
    payments: list[PaymentRead]


class GatewayChargeResult(BaseModel):
    """The final result of a charge, as the gateway's webhook carries it."""

    charge_id: str
    idempotency_key: str = Field(description="the key Atrium charged with: the payment's")
    status: Literal["succeeded", "declined"]
    failure_code: str | None = None
    failure_message: str | None = None


class GatewayWebhookEvent(BaseModel):
    """What the payment gateway posts to the webhook (adapters/gateway.py decodes it after checking
    the signature over these exact bytes); documents the body, which the route reads itself."""

    id: str = Field(description="the event's id: a redelivered event is applied once")
    type: Literal["charge.succeeded", "charge.failed"]
    data: GatewayChargeResult


class WebhookReceipt(BaseModel):
    """The answer to the gateway: the delivery was verified and recorded (applied once)."""

    received: bool


class ChargePayment(BaseModel):
    """Payload of the ``billing.charge_payment`` job."""

    payment_id: uuid.UUID
