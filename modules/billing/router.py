"""Billing HTTP API: invoices, payments (idempotent), and the gateway's webhook."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from core.edge.auth import CurrentPrincipal
from core.edge.errors import BadRequest
from core.edge.idempotency import (
    KEY_HEADER,
    KEY_PARAMETER,
    IdempotencyStore,
    StoredResponse,
    check_key,
    fingerprint,
    run_once,
)
from core.edge.openapi import ID, errors, link, linked_from, links, raw_body
from core.edge.pagination import Cursor
from core.edge.provided import Provided
from core.edge.routes import DbSession, TransactionalRoute
from modules.billing.adapters.gateway import (
    SIGNATURE_HEADER,
    SIGNATURE_TOLERANCE_SECONDS,
    InvalidWebhook,
    PaymentGateway,
)
from modules.billing.schemas import (
    GatewayWebhookEvent,
    InvoiceCreate,
    InvoicePage,
    InvoiceRead,
    PaymentCreate,
    PaymentList,
    PaymentRead,
    WebhookReceipt,
)
from modules.billing.service.invoices import InvoiceService
from modules.billing.service.payments import PaymentService

router = APIRouter(tags=["billing"], route_class=TransactionalRoute)
Invoices = Annotated[InvoiceService, Provided("billing.invoices")]
Payments = Annotated[PaymentService, Provided("billing.payments")]
Idempotency = Annotated[IdempotencyStore, Provided("billing.idempotency")]
Gateway = Annotated[PaymentGateway, Provided("billing.payment_gateway")]

# Someone else's invoice or payment is a 404 like one that does not exist (a 401 without a live
# session comes with the bearer scheme, core.edge.openapi).
_OWNED = {404: "not_found"}
_CURSOR = {400: "invalid_cursor"}
# The gateway's signature of a webhook delivery (adapters/gateway.py verifies it).
_SIGNATURE = {
    "in": "header", "name": SIGNATURE_HEADER, "required": True,
    "description": f't=<unix seconds>,v1=<hex HMAC-SHA256 of "t." + body>; at most '
                   f"{SIGNATURE_TOLERANCE_SECONDS} s old",
    "schema": {"type": "string", "examples": ["t=1767225600,v1=" + "6f1b2d55e5c3a1c2" * 4]},
}


_INVOICE_CREATED = links(
    201,
    ReadInvoice=link("billing.read_invoice", "The new invoice.", invoice_id=ID),
    PayInvoice=link("billing.pay_invoice", "Pay the new invoice.", invoice_id=ID),
    VoidInvoice=link("billing.void_invoice", "Cancel the new invoice.", invoice_id=ID),
    ListInvoicePayments=link("billing.list_invoice_payments", "The new invoice's payments.", invoice_id=ID),
)
_PAYMENT_ACCEPTED = links(202, ReadPayment=link("billing.read_payment", "The new payment.", payment_id=ID))


@router.post("/invoices", status_code=201, response_model=InvoiceRead,
             responses={**errors({422: ["validation_error", "invalid_lines", "duplicate_items",
                                        "invalid_quantity", "unknown_items", "mixed_currencies",
                                        "total_too_large"]}),
                        **_INVOICE_CREATED},
             openapi_extra=linked_from("items.create_item", 201, InvoiceItem=link(
                 "billing.create_invoice", "Invoice one of the new item.",
                 body={"lines": [{"item_id": ID, "quantity": 1}]})))
async def create_invoice(body: InvoiceCreate, principal: CurrentPrincipal, session: DbSession,
                         invoices: Invoices, request: Request, response: Response) -> InvoiceRead:
    """Open an invoice for the caller, priced from the catalog at this moment."""
    requested = [(line.item_id, line.quantity) for line in body.lines]
    invoice = await invoices.create(session, principal, requested)
    response.headers["Location"] = request.url_for("read_invoice", invoice_id=invoice.id).path
    return InvoiceRead.model_validate(invoice, from_attributes=True)


@router.get("/invoices", response_model=InvoicePage, responses=errors(_CURSOR))
async def list_invoices(
    principal: CurrentPrincipal,
    session: DbSession,
    invoices: Invoices,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[Cursor | None, Query()] = None,
    status: Annotated[Literal["open", "paid", "void"] | None, Query()] = None,
) -> InvoicePage:
    """The caller's invoices, newest first (an admin sees everyone's); keyset-paginated."""
    page, next_cursor = await invoices.list(session, principal, limit, cursor, status)
    return InvoicePage(invoices=[InvoiceRead.model_validate(i, from_attributes=True) for i in page],
                       next_cursor=next_cursor)


@router.get("/invoices/{invoice_id}", response_model=InvoiceRead, responses=errors(_OWNED))
async def read_invoice(invoice_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession,
                       invoices: Invoices) -> InvoiceRead:
    """One invoice: its owner's or, for an admin, anyone's."""
    return InvoiceRead.model_validate(await invoices.get_visible(session, principal, invoice_id),
                                      from_attributes=True)


@router.post("/invoices/{invoice_id}/void", response_model=InvoiceRead,
             responses=errors({**_OWNED, 409: ["invalid_transition", "payment_in_progress"]}))
async def void_invoice(invoice_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession,
                       invoices: Invoices) -> InvoiceRead:
    """Cancel an open invoice (its owner or an admin)."""
    voided = await invoices.void(session, principal, invoice_id)
    return InvoiceRead.model_validate(voided, from_attributes=True)


@router.post(
    "/invoices/{invoice_id}/payments",
    status_code=202,
    response_model=PaymentRead,
    responses={**errors({
        **_OWNED,
        400: ["idempotency_key_required", "invalid_idempotency_key"],
        409: ["invoice_not_open", "nothing_to_pay", "payment_in_progress", "idempotency_request_in_progress",
              "idempotency_claim_lost"],
        422: ["validation_error", "idempotency_key_reused"],
    }), **_PAYMENT_ACCEPTED},
    # The header is read here as optional so that its absence is the contract's 400, not a 422; the
    # document states what the server requires.
    openapi_extra={"parameters": [KEY_PARAMETER]},
)
async def pay_invoice(
    invoice_id: uuid.UUID,
    body: PaymentCreate,
    principal: CurrentPrincipal,
    session: DbSession,
    payments: Payments,
    store: Idempotency,
    request: Request,
    # Checked by check_key (400, not 422: the contract's codes): 1-255 visible ASCII characters, so
    # nothing a column or a log line cannot hold is ever stored.
    idempotency_key: Annotated[str | None, Header(alias=KEY_HEADER, include_in_schema=False)] = None,
) -> Response:
    """Pay the whole invoice; answers 202 ``pending`` at once and a job charges the gateway.

    Requires ``Idempotency-Key``: a retry with the same key and body replays the first answer
    (``Idempotent-Replayed: true``) and never charges twice.
    """
    key = check_key(idempotency_key)

    async def accept() -> StoredResponse:
        payment = await payments.start(session, principal, invoice_id, body.payment_token)
        return StoredResponse(202, PaymentRead.model_validate(payment).model_dump(mode="json"))

    stored, replayed = await run_once(
        store, session, f"billing.payments:{principal.user_id}", key,
        fingerprint(request.method, request.url.path, await request.body()), accept,
    )
    headers = {"Location": request.url_for("read_payment", payment_id=stored.body["id"]).path}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(stored.body, status_code=stored.status, headers=headers)


@router.get("/invoices/{invoice_id}/payments", response_model=PaymentList, responses=errors(_OWNED))
async def list_invoice_payments(invoice_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession,
                                payments: Payments) -> PaymentList:
    """Every payment attempt on an invoice, oldest first."""
    found = await payments.of_invoice(session, principal, invoice_id)
    return PaymentList(payments=[PaymentRead.model_validate(p) for p in found])


@router.get("/payments/{payment_id}", response_model=PaymentRead, responses=errors(_OWNED))
async def read_payment(payment_id: uuid.UUID, principal: CurrentPrincipal, session: DbSession,
                       payments: Payments) -> PaymentRead:
    """One payment: its owner's or, for an admin, anyone's."""
    return PaymentRead.model_validate(await payments.get_visible(session, principal, payment_id))


@router.post("/webhooks/payment-gateway", response_model=WebhookReceipt,
             responses=errors({400: "invalid_signature", 413: "payload_too_large"}),
             openapi_extra={"parameters": [_SIGNATURE],
                            **raw_body(GatewayWebhookEvent, "The gateway's event: the bytes it signed.")})
async def gateway_webhook(request: Request, session: DbSession, payments: Payments,
                          gateway: Gateway) -> WebhookReceipt:
    """The gateway's signed notice of a late charge result; each event is applied once."""
    try:
        event = gateway.parse_webhook(await request.body(), request.headers)
    except InvalidWebhook as exc:
        raise BadRequest(f"The webhook could not be verified: {exc}.", code="invalid_signature") from None
    await payments.apply_webhook(session, event)
    return WebhookReceipt(received=True)
