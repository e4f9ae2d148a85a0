"""Billing through the HTTP API: items, invoices, payments and what came of them."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.support.api import bearer, make_admin, sign_up
from tests.support.stack import Stack
from tests.support.waiting import eventually

INVOICES = "/api/v1/invoices"
ITEMS = "/api/v1/items"


async def new_item(stack: Stack, admin: dict[str, str], price: int = 250, currency: str = "EUR") -> str:
    body = {"name": f"Item {uuid.uuid4().hex[:8]}", "price": price, "currency": currency}
    response = await stack.client.post(ITEMS, json=body, headers=admin)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def new_invoice(stack: Stack, headers: dict[str, str], *lines: tuple[str, int]) -> dict[str, Any]:
    body = {"lines": [{"item_id": item_id, "quantity": qty} for item_id, qty in lines]}
    response = await stack.client.post(INVOICES, json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def pay(stack: Stack, headers: dict[str, str], invoice_id: str, token: str = "tok_visa",
              key: str | None = None) -> httpx.Response:
    return await stack.client.post(
        f"{INVOICES}/{invoice_id}/payments", json={"payment_token": token},
        headers={**headers, "Idempotency-Key": key or uuid.uuid4().hex},
    )


async def settled(stack: Stack, headers: dict[str, str], payment_id: str) -> dict[str, Any]:
    """The payment once it has left ``pending``."""
    found: dict[str, Any] = {}

    async def done() -> bool:
        response = await stack.client.get(f"/api/v1/payments/{payment_id}", headers=headers)
        assert response.status_code == 200, response.text
        found.update(response.json())
        return bool(found["status"] != "pending")

    await eventually(done, within=20)
    return found


async def payment_of(stack: Stack, headers: dict[str, str], payment_id: str) -> dict[str, Any]:
    response = await stack.client.get(f"/api/v1/payments/{payment_id}", headers=headers)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def invoice_status(stack: Stack, headers: dict[str, str], invoice_id: str) -> str:
    response = await stack.client.get(f"{INVOICES}/{invoice_id}", headers=headers)
    assert response.status_code == 200, response.text
    return str(response.json()["status"])


def receipts(stack: Stack, email: str) -> int:
    """How many payment receipts were mailed to ``email``."""
    return sum(1 for subject, _ in stack.mails(email) if "receipt" in subject)


async def customer_with_invoice(stack: Stack, price: int = 1250, quantity: int = 2) -> tuple[
        dict[str, str], str, dict[str, Any]]:
    """An admin-made item, a new user and an open invoice of theirs: (user headers, email, invoice)."""
    admin = bearer(await make_admin(stack))
    user, token = await sign_up(stack.client, full_name="Alice Example")
    invoice = await new_invoice(stack, bearer(token), (await new_item(stack, admin, price), quantity))
    return bearer(token), user["email"], invoice
