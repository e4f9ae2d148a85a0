"""One request id from the HTTP request through every job it causes, across processes.

On the production profile the jobs run in a separate ``atrium worker`` process that writes JSON
log lines; a payment's charge job publishes an event whose receipt job must carry the same id.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy import select

from core.messaging.outbox import OutboxMessage
from tests.support.api import bearer, make_admin, sign_up, signup_body
from tests.support.billing import new_invoice, new_item, pay, settled
from tests.support.stack import Stack
from tests.support.waiting import eventually


def worker_lines(stack: Stack, request_id: str) -> list[dict[str, Any]]:
    assert stack.worker_log is not None
    lines = []
    for raw in stack.worker_log.read_text(errors="replace").splitlines():
        if request_id in raw and raw.startswith("{"):
            lines.append(json.loads(raw))
    return [line for line in lines if line.get("request_id") == request_id]


async def outbox_names(stack: Stack, request_id: str) -> set[str]:
    """What the request (and the jobs it caused) wrote to the outbox under its id."""
    async with stack.container.sessions()() as session:
        rows = await session.scalars(select(OutboxMessage.name).where(OutboxMessage.request_id == request_id))
        return set(rows)


async def carried(stack: Stack, request_id: str, outbox: set[str], jobs: set[str]) -> bool:
    """Every outbox row and, on production, every worker 'done' line carries the request id."""
    if not outbox <= await outbox_names(stack, request_id):
        return False
    if stack.worker_log is None:
        return True
    logged = {line["msg"] for line in worker_lines(stack, request_id)}
    return all(any(f"job {task} done" in msg for msg in logged) for task in jobs)


class TestCorrelation:
    async def test_a_well_formed_request_id_is_echoed_and_reaches_the_welcome_job(self, stack: Stack) -> None:
        request_id = f"corr-{uuid.uuid4().hex}"

        response = await stack.client.post("/api/v1/users", json=signup_body(),
                                           headers={"X-Request-ID": request_id})

        assert response.status_code == 201
        assert response.headers["x-request-id"] == request_id
        await eventually(lambda: carried(stack, request_id, {"users.UserRegistered"},
                                         {"users.send_welcome_email"}), within=15)

    async def test_a_payment_carries_its_request_id_into_the_charge_and_the_receipt(
        self, stack: Stack
    ) -> None:
        admin = bearer(await make_admin(stack))
        _, token = await sign_up(stack.client)
        user = bearer(token)
        invoice = await new_invoice(stack, user, (await new_item(stack, admin), 1))
        request_id = f"pay-{uuid.uuid4().hex}"

        response = await pay(stack, {**user, "X-Request-ID": request_id}, invoice["id"])

        assert response.headers["x-request-id"] == request_id
        assert (await settled(stack, user, response.json()["id"]))["status"] == "succeeded"
        # The receipt job is caused by an event the charge job published: same id, two hops.
        await eventually(lambda: carried(
            stack, request_id, {"billing.charge_payment", "billing.PaymentSucceeded"},
            {"billing.charge_payment", "billing.send_receipt"},
        ), within=15)

    async def test_a_malformed_request_id_is_replaced(self, stack: Stack) -> None:
        for forged in ["bad id with spaces", "x" * 300, "short", "new\nline-0123456789"]:
            response = await stack.client.get("/health/live", headers={"X-Request-ID": forged})
            echoed = response.headers["x-request-id"]
            assert echoed != forged
            assert len(echoed) == 32
            int(echoed, 16)  # a fresh uuid4 hex
