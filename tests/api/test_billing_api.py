"""The billing HTTP contract (DESIGN.md §5), on both profiles.

Development: the in-memory fake gateway and the in-process worker. Production: the HTTP gateway
adapter talking to a real local gateway server, and a separate ``atrium worker`` process.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.support.api import bearer, make_admin, sign_up
from tests.support.billing import INVOICES, ITEMS, new_invoice, new_item, pay, settled
from tests.support.envelope import assert_envelope
from tests.support.stack import Stack
from tests.support.waiting import eventually

WEBHOOK = "/api/v1/webhooks/payment-gateway"


@pytest.fixture(scope="session")
async def admin(stack: Stack) -> dict[str, str]:
    return bearer(await make_admin(stack))


@pytest.fixture
async def alice(stack: Stack) -> dict[str, str]:
    """A fresh user per test, so listings and mail counts are the test's own."""
    _, token = await sign_up(stack.client, full_name="Alice Example")
    return bearer(token)


@pytest.fixture
async def mallory(stack: Stack) -> dict[str, str]:
    _, token = await sign_up(stack.client, full_name="Mallory Other")
    return bearer(token)


async def invoice_of(stack: Stack, headers: dict[str, str], invoice_id: str) -> dict[str, Any]:
    response = await stack.client.get(f"{INVOICES}/{invoice_id}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def me(stack: Stack, headers: dict[str, str]) -> dict[str, Any]:
    return (await stack.client.get("/api/v1/users/me", headers=headers)).json()


class TestCreateInvoice:
    async def test_lines_are_priced_from_the_catalog_at_that_moment(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        pen, ink = await new_item(stack, admin, 250), await new_item(stack, admin, 1999)

        invoice = await new_invoice(stack, alice, (pen, 3), (ink, 1))

        assert invoice["status"] == "open"
        assert invoice["currency"] == "EUR"
        assert invoice["total"] == 3 * 250 + 1999
        assert [(line["item_id"], line["unit_price"], line["quantity"], line["amount"])
                for line in invoice["lines"]] == [(pen, 250, 3, 750), (ink, 1999, 1, 1999)]
        assert invoice["user_id"] == (await me(stack, alice))["id"]
        # A later price change does not touch an invoice already made.
        patched = await stack.client.patch(f"{ITEMS}/{pen}", json={"price": 999}, headers=admin)
        assert patched.status_code == 200
        assert (await invoice_of(stack, alice, invoice["id"]))["total"] == 2749
        assert (await new_invoice(stack, alice, (pen, 3)))["total"] == 2997

    async def test_the_location_header_leads_to_the_invoice(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        body = {"lines": [{"item_id": await new_item(stack, admin), "quantity": 1}]}
        response = await stack.client.post(INVOICES, json=body, headers=alice)
        assert response.headers["location"] == f"{INVOICES}/{response.json()['id']}"  # a path, as items'
        followed = await stack.client.get(response.headers["location"], headers=alice)
        assert followed.status_code == 200
        assert followed.json() == response.json()

    async def test_mixing_currencies_is_refused(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        eur, usd = await new_item(stack, admin, currency="EUR"), await new_item(stack, admin, currency="USD")
        body = {"lines": [{"item_id": eur, "quantity": 1}, {"item_id": usd, "quantity": 1}]}

        error = assert_envelope(await stack.client.post(INVOICES, json=body, headers=alice), 422,
                                "mixed_currencies")
        assert error["details"]["currencies"] == ["EUR", "USD"]

    async def test_unknown_and_repeated_items_are_refused(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        known, missing = await new_item(stack, admin), str(uuid.uuid4())
        lines = [{"item_id": known, "quantity": 1}, {"item_id": missing, "quantity": 1}]
        unknown = await stack.client.post(INVOICES, json={"lines": lines}, headers=alice)
        assert assert_envelope(unknown, 422, "unknown_items")["details"]["item_ids"] == [missing]
        repeated = await stack.client.post(
            INVOICES, json={"lines": [{"item_id": known, "quantity": 1}, {"item_id": known, "quantity": 2}]},
            headers=alice,
        )
        assert assert_envelope(repeated, 422, "duplicate_items")["details"]["item_ids"] == [known]

    @pytest.mark.parametrize("lines", [
        pytest.param([], id="no-lines"),
        pytest.param([{"quantity": 1}], id="no-item"),
        pytest.param([{"item_id": "not-a-uuid", "quantity": 1}], id="bad-id"),
        pytest.param([{"item_id": str(uuid.uuid4()), "quantity": 0}], id="zero"),
        pytest.param([{"item_id": str(uuid.uuid4()), "quantity": 10_001}], id="too-many"),
        pytest.param([{"item_id": str(uuid.uuid4()), "quantity": "2"}], id="string"),
        pytest.param([{"item_id": str(uuid.uuid4()), "quantity": 1.5}], id="fraction"),
        pytest.param([{"item_id": str(uuid.uuid4()), "quantity": 1}] * 101, id="101-lines"),
    ])
    async def test_malformed_lines_are_422(
        self, stack: Stack, alice: dict[str, str], lines: list[Any]
    ) -> None:
        response = await stack.client.post(INVOICES, json={"lines": lines}, headers=alice)
        assert_envelope(response, 422, "validation_error")

    async def test_anonymous_callers_get_401(self, stack: Stack) -> None:
        response = await stack.client.post(INVOICES, json={"lines": []})
        assert_envelope(response, 401, "not_authenticated")


class TestReadInvoices:
    async def test_owner_and_admin_see_an_invoice_others_get_404(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], mallory: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 2))

        assert await invoice_of(stack, alice, invoice["id"]) == invoice
        assert await invoice_of(stack, admin, invoice["id"]) == invoice
        hidden = await stack.client.get(f"{INVOICES}/{invoice['id']}", headers=mallory)
        absent = await stack.client.get(f"{INVOICES}/{uuid.uuid4()}", headers=mallory)
        assert assert_envelope(hidden, 404, "not_found") == assert_envelope(absent, 404, "not_found")

    async def test_listing_is_own_newest_first_and_paginated(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], mallory: dict[str, str]
    ) -> None:
        item = await new_item(stack, admin)
        made = [(await new_invoice(stack, alice, (item, n)))["id"] for n in (1, 2, 3)]
        await new_invoice(stack, mallory, (item, 1))

        first = (await stack.client.get(INVOICES, params={"limit": 2}, headers=alice)).json()
        second = (await stack.client.get(INVOICES, params={"limit": 2, "cursor": first["next_cursor"]},
                                         headers=alice)).json()

        assert [i["id"] for i in first["invoices"]] == made[::-1][:2]
        assert [i["id"] for i in second["invoices"]] == made[:1]
        assert second["next_cursor"] is None
        assert [line["quantity"] for i in first["invoices"] for line in i["lines"]] == [3, 2]

    async def test_admins_list_everyones_invoices(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], mallory: dict[str, str]
    ) -> None:
        item = await new_item(stack, admin)
        mine = await new_invoice(stack, alice, (item, 1))
        theirs = await new_invoice(stack, mallory, (item, 1))

        listed = (await stack.client.get(INVOICES, params={"limit": 5}, headers=admin)).json()["invoices"]

        assert {mine["id"], theirs["id"]} <= {i["id"] for i in listed}

    async def test_status_filter(self, stack: Stack, admin: dict[str, str], alice: dict[str, str]) -> None:
        item = await new_item(stack, admin)
        kept, voided = await new_invoice(stack, alice, (item, 1)), await new_invoice(stack, alice, (item, 1))
        assert (await stack.client.post(f"{INVOICES}/{voided['id']}/void", headers=alice)).status_code == 200

        def ids(response: httpx.Response) -> list[str]:
            return [i["id"] for i in response.json()["invoices"]]

        def listed(status: str) -> Any:
            return stack.client.get(INVOICES, params={"status": status}, headers=alice)

        assert ids(await listed("void")) == [voided["id"]]
        assert ids(await listed("open")) == [kept["id"]]
        assert_envelope(await stack.client.get(INVOICES, params={"status": "lost"}, headers=alice), 422,
                        "validation_error")

    async def test_a_cursor_works_only_for_its_owner_and_filters(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], mallory: dict[str, str]
    ) -> None:
        item = await new_item(stack, admin)
        for _ in range(2):
            await new_invoice(stack, alice, (item, 1))
        cursor = (await stack.client.get(INVOICES, params={"limit": 1}, headers=alice)).json()["next_cursor"]

        stolen = await stack.client.get(INVOICES, params={"limit": 1, "cursor": cursor}, headers=mallory)
        refiltered = await stack.client.get(INVOICES, params={"limit": 1, "cursor": cursor, "status": "paid"},
                                            headers=alice)
        forged = await stack.client.get(INVOICES, params={"cursor": cursor[:-2] + "xx"}, headers=alice)
        for response in (stolen, refiltered, forged):
            assert_envelope(response, 400, "invalid_cursor")


class TestVoid:
    async def test_open_becomes_void_once_and_can_no_longer_be_paid(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], mallory: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        url = f"{INVOICES}/{invoice['id']}/void"

        assert_envelope(await stack.client.post(url, headers=mallory), 404, "not_found")
        voided = await stack.client.post(url, headers=alice)
        assert voided.status_code == 200
        assert voided.json()["status"] == "void"
        assert voided.json()["voided_at"] is not None

        again = assert_envelope(await stack.client.post(url, headers=alice), 409, "invalid_transition")
        assert again["details"] == {"status": "void", "requested": "void"}
        assert_envelope(await pay(stack, alice, invoice["id"]), 409, "invoice_not_open")

    async def test_a_paid_invoice_cannot_be_voided(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        payment = (await pay(stack, alice, invoice["id"])).json()
        assert (await settled(stack, alice, payment["id"]))["status"] == "succeeded"

        error = assert_envelope(await stack.client.post(f"{INVOICES}/{invoice['id']}/void", headers=admin),
                                409, "invalid_transition")
        assert error["details"] == {"status": "paid", "requested": "void"}


class TestPayments:
    async def test_a_payment_succeeds_pays_the_invoice_and_mails_a_receipt(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin, 1250), 2))

        accepted = await pay(stack, alice, invoice["id"])

        assert accepted.status_code == 202, accepted.text
        payment = accepted.json()
        assert (payment["status"], payment["amount"], payment["currency"]) == ("pending", 2500, "EUR")
        assert not {"payment_token", "token"} & set(payment)
        followed = await stack.client.get(accepted.headers["location"], headers=alice)
        assert followed.json()["id"] == payment["id"]
        done = await settled(stack, alice, payment["id"])
        assert done["status"] == "succeeded"
        assert done["settled_at"] is not None
        paid = await invoice_of(stack, alice, invoice["id"])
        assert paid["status"] == "paid"
        assert paid["paid_at"] is not None
        email = (await me(stack, alice))["email"]
        await eventually(lambda: stack.mail_count(email) == 2)  # welcome + receipt
        [(subject, body)] = [m for m in stack.mails(email) if "receipt" in m[0]]
        assert subject == "Your Atrium receipt: 25.00 EUR"
        assert "Hi Alice," in body
        assert invoice["id"] in body
        assert "2 x " in body
        assert len(stack.gateway.ledger.successful_charges(payment["id"])) == 1
        listed = (await stack.client.get(f"{INVOICES}/{invoice['id']}/payments", headers=alice)).json()
        assert [p["id"] for p in listed["payments"]] == [payment["id"]]

    async def test_the_same_key_and_body_replay_the_first_answer(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        key = f"key-{uuid.uuid4()}"

        first = await pay(stack, alice, invoice["id"], key=key)
        await settled(stack, alice, first.json()["id"])
        again = await pay(stack, alice, invoice["id"], key=key)

        assert (again.status_code, again.json()) == (first.status_code, first.json())
        assert again.json()["status"] == "pending"  # the first answer, not the current state
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        assert len(stack.gateway.ledger.successful_charges(first.json()["id"])) == 1

    async def test_the_same_key_with_another_body_is_422(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        item = await new_item(stack, admin)
        invoice = await new_invoice(stack, alice, (item, 1))
        other = await new_invoice(stack, alice, (item, 1))
        key = uuid.uuid4().hex
        assert (await pay(stack, alice, invoice["id"], key=key)).status_code == 202

        assert_envelope(await pay(stack, alice, invoice["id"], "tok_mastercard", key=key), 422,
                        "idempotency_key_reused")
        assert_envelope(await pay(stack, alice, other["id"], key=key), 422, "idempotency_key_reused")

    async def test_keys_are_per_user(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], mallory: dict[str, str]
    ) -> None:
        item = await new_item(stack, admin)
        invoice = await new_invoice(stack, alice, (item, 1))
        theirs = await new_invoice(stack, mallory, (item, 1))
        key = uuid.uuid4().hex

        assert (await pay(stack, alice, invoice["id"], key=key)).status_code == 202
        response = await pay(stack, mallory, theirs["id"], key=key)

        assert response.status_code == 202
        assert response.json()["invoice_id"] == theirs["id"]

    @pytest.mark.parametrize(("key", "code"), [
        pytest.param(None, "idempotency_key_required", id="missing"),
        pytest.param("has space", "invalid_idempotency_key", id="space"),
        pytest.param("k" * 256, "invalid_idempotency_key", id="too-long"),
    ])
    async def test_a_missing_or_malformed_key_is_400(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], key: str | None, code: str
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        headers = {**alice, **({"Idempotency-Key": key} if key is not None else {})}

        response = await stack.client.post(f"{INVOICES}/{invoice['id']}/payments",
                                           json={"payment_token": "tok_visa"}, headers=headers)

        assert_envelope(response, 400, code)
        assert (await stack.client.get(f"{INVOICES}/{invoice['id']}/payments", headers=alice)).json() == {
            "payments": []}

    @pytest.mark.parametrize("body", [
        pytest.param({}, id="missing"),
        pytest.param({"payment_token": ""}, id="empty"),
        pytest.param({"payment_token": "tok visa"}, id="space"),
        pytest.param({"payment_token": 42}, id="number"),
        pytest.param({"payment_token": "tok_visa", "amount": 1}, id="extra-field"),
    ])
    async def test_a_malformed_token_is_422(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], body: dict[str, Any]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        response = await stack.client.post(f"{INVOICES}/{invoice['id']}/payments", json=body,
                                           headers={**alice, "Idempotency-Key": uuid.uuid4().hex})
        assert_envelope(response, 422, "validation_error")

    async def test_a_declined_card_fails_the_payment_and_the_invoice_stays_payable(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))

        attempt = await pay(stack, alice, invoice["id"], "tok_chargeDeclined")
        declined = await settled(stack, alice, attempt.json()["id"])

        assert (declined["status"], declined["failure_code"]) == ("failed", "card_declined")
        assert declined["failure_message"]
        assert (await invoice_of(stack, alice, invoice["id"]))["status"] == "open"
        retried = await settled(stack, alice, (await pay(stack, alice, invoice["id"])).json()["id"])
        assert retried["status"] == "succeeded"
        assert (await invoice_of(stack, alice, invoice["id"]))["status"] == "paid"

    async def test_a_token_the_gateway_refuses_fails_the_payment(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        attempt = await pay(stack, alice, invoice["id"], "card_4242")
        failed = await settled(stack, alice, attempt.json()["id"])
        assert (failed["status"], failed["failure_code"]) == ("failed", "invalid_token")

    async def test_one_payment_at_a_time_and_none_after_paid(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        pending = (await pay(stack, alice, invoice["id"], "tok_async")).json()

        busy = assert_envelope(await pay(stack, alice, invoice["id"]), 409, "payment_in_progress")
        assert busy["details"]["payment_id"] == pending["id"]
        assert_envelope(await stack.client.post(f"{INVOICES}/{invoice['id']}/void", headers=alice), 409,
                        "payment_in_progress")
        await eventually(lambda: pending["id"] in stack.gateway.ledger.charges)  # the job has charged
        await settle_by_webhook(stack)
        assert (await settled(stack, alice, pending["id"]))["status"] == "succeeded"
        assert_envelope(await pay(stack, alice, invoice["id"]), 409, "invoice_not_open")

    async def test_a_zero_total_invoice_has_nothing_to_pay(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin, price=0), 3))
        assert invoice["total"] == 0
        assert_envelope(await pay(stack, alice, invoice["id"]), 409, "nothing_to_pay")

    async def test_a_transient_gateway_outage_is_retried_and_charges_once(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        # The HTTP adapter retries inside one job (3 attempts); more failures make the job retry too.
        stack.gateway.fail_next(4)

        payment = (await pay(stack, alice, invoice["id"])).json()

        assert (await settled(stack, alice, payment["id"]))["status"] == "succeeded"
        assert len(stack.gateway.ledger.successful_charges(payment["id"])) == 1


async def settle_by_webhook(stack: Stack) -> list[httpx.Response]:
    """Let the gateway settle its pending charges and deliver the signed webhooks to the API."""
    responses = []
    for _, body, headers in stack.gateway.settle_pending():
        responses.append(await stack.client.post(WEBHOOK, content=body, headers=headers))
    return responses


class TestWebhooks:
    async def test_an_asynchronous_charge_settles_by_signed_webhook_once(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        payment = (await pay(stack, alice, invoice["id"], "tok_async")).json()

        async def charged_at_gateway() -> bool:
            return payment["id"] in stack.gateway.ledger.charges

        await eventually(charged_at_gateway)
        # Until the webhook arrives the payment waits; a redelivered job does not charge again.
        assert (await stack.client.get(f"/api/v1/payments/{payment['id']}", headers=alice)).json()[
            "status"] == "pending"

        deliveries = stack.gateway.settle_pending()
        for _, body, headers in deliveries * 2:  # the gateway may deliver twice
            response = await stack.client.post(WEBHOOK, content=body, headers=headers)
            assert response.status_code == 200
            assert response.json() == {"received": True}

        assert (await settled(stack, alice, payment["id"]))["status"] == "succeeded"
        assert (await invoice_of(stack, alice, invoice["id"]))["status"] == "paid"
        email = (await me(stack, alice))["email"]
        await eventually(lambda: stack.mail_count(email) == 2)

    async def test_an_asynchronous_decline_fails_the_payment(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        payment = (await pay(stack, alice, invoice["id"], "tok_asyncDeclined")).json()
        await eventually(lambda: payment["id"] in stack.gateway.ledger.charges)

        await settle_by_webhook(stack)

        failed = await settled(stack, alice, payment["id"])
        assert (failed["status"], failed["failure_code"]) == ("failed", "card_declined")
        assert (await invoice_of(stack, alice, invoice["id"]))["status"] == "open"

    @pytest.mark.parametrize("tamper", ["body", "signature", "missing"])
    async def test_an_unverifiable_webhook_is_400_and_changes_nothing(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], tamper: str
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        payment = (await pay(stack, alice, invoice["id"], "tok_async")).json()
        await eventually(lambda: payment["id"] in stack.gateway.ledger.charges)
        deliveries = [d for d in stack.gateway.settle_pending() if d[0].idempotency_key == payment["id"]]
        [(_, body, headers)] = deliveries
        headers = dict(headers)
        if tamper == "body":
            body = body.replace(b"succeeded", b"succeedes")
        elif tamper == "signature":
            headers = {k: v[:-4] + "0000" for k, v in headers.items()}
        else:
            headers = {"Content-Type": "application/json"}

        response = await stack.client.post(WEBHOOK, content=body, headers=headers)

        assert_envelope(response, 400, "invalid_signature")
        current = (await stack.client.get(f"/api/v1/payments/{payment['id']}", headers=alice)).json()
        assert current["status"] == "pending"


class TestOwnership:
    async def test_every_billing_route_hides_another_users_records(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], mallory: dict[str, str]
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        payment = (await pay(stack, alice, invoice["id"])).json()
        await settled(stack, alice, payment["id"])
        base = f"{INVOICES}/{invoice['id']}"

        attempts = [
            await stack.client.get(base, headers=mallory),
            await stack.client.post(f"{base}/void", headers=mallory),
            await pay(stack, mallory, invoice["id"]),
            await stack.client.get(f"{base}/payments", headers=mallory),
            await stack.client.get(f"/api/v1/payments/{payment['id']}", headers=mallory),
        ]

        for response in attempts:
            assert_envelope(response, 404, "not_found")
        listed = (await stack.client.get(INVOICES, params={"limit": 100}, headers=mallory)).json()
        assert invoice["id"] not in {i["id"] for i in listed["invoices"]}
        assert (await stack.client.get(f"/api/v1/payments/{payment['id']}", headers=admin)).status_code == 200
        assert (await stack.client.get(f"{base}/payments", headers=admin)).status_code == 200

    async def test_every_billing_route_needs_a_token(self, stack: Stack) -> None:
        some = uuid.uuid4()
        attempts = [
            await stack.client.get(INVOICES),
            await stack.client.get(f"{INVOICES}/{some}"),
            await stack.client.post(f"{INVOICES}/{some}/void"),
            await stack.client.post(f"{INVOICES}/{some}/payments", json={"payment_token": "tok_visa"},
                                    headers={"Idempotency-Key": "k"}),
            await stack.client.get(f"{INVOICES}/{some}/payments"),
            await stack.client.get(f"/api/v1/payments/{some}"),
        ]
        for response in attempts:
            assert_envelope(response, 401, "not_authenticated")


class TestHostileInput:
    """Numbers past their column and text the database cannot store are 422s (issue 15)."""

    @pytest.mark.parametrize("quantity", [2**31, 2**63, 2**64, 10**30, -(2**63) - 1])
    async def test_a_quantity_past_the_column_is_422(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], quantity: int
    ) -> None:
        item = await new_item(stack, admin)
        lines = [{"item_id": item, "quantity": quantity}]
        response = await stack.client.post(INVOICES, json={"lines": lines}, headers=alice)
        error = assert_envelope(response, 422, "validation_error")
        assert ["body", "lines", "0", "quantity"] in [e["loc"] for e in error["details"]["errors"]]
        assert (await stack.client.get(INVOICES, headers=alice)).json()["invoices"] == []

    @pytest.mark.parametrize("token", ["tok_\u0000visa", "tok_visa\n", "tok_\ud800"])
    async def test_a_token_with_a_control_character_or_lone_surrogate_is_422(
        self, stack: Stack, admin: dict[str, str], alice: dict[str, str], token: str
    ) -> None:
        invoice = await new_invoice(stack, alice, (await new_item(stack, admin), 1))
        raw = json.dumps({"payment_token": token})  # a lone surrogate goes out as "\ud800"
        response = await stack.client.post(
            f"{INVOICES}/{invoice['id']}/payments", content=raw,
            headers={**alice, "Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"},
        )
        assert_envelope(response, 422, "validation_error")
        assert (await stack.client.get(f"{INVOICES}/{invoice['id']}/payments", headers=alice)).json() == {
            "payments": []}

    @pytest.mark.parametrize("params", [{"cursor": "abc\u0000"}, {"cursor": "x" * 513}, {"limit": str(2**63)},
                                        {"status": "open\u0000"}])
    async def test_hostile_query_parameters_are_422(
        self, stack: Stack, alice: dict[str, str], params: dict[str, str]
    ) -> None:
        response = await stack.client.get(INVOICES, params=params, headers=alice)
        assert_envelope(response, 422, "validation_error")
