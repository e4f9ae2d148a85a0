"""Locust load test of Atrium's main user journeys (against ``deploy/scale-out`` or any deploy).

    ATRIUM_EXTRAS="dev load" make bootstrap
    deploy/scale-out --port 8088 &                       # creates a few items; wait for "ready"
    .venv/bin/locust -f bench/locustfile.py --headless -u 20 -r 5 -t 30s --host http://127.0.0.1:8088

Each simulated user signs up and logs in once, then mixes: browsing the catalog (list + get by
id), reading its profile, and buying (create an invoice, pay it with an ``Idempotency-Key``,
poll the payment until it leaves ``pending``). Some payments use ``tok_async`` (settled later by
the gateway's webhook) and some requests are replayed with the same key, which must answer the
same payment with ``Idempotent-Replayed: true``. The time from paying to ``succeeded`` is
reported as the ``FLOW pay -> settled`` row.

Every user sends its own ``X-Forwarded-For`` address from 198.18.0.0/15 (the range set aside for
benchmarks, RFC 2544): behind a proxy Atrium trusts, per-client rate limits then see twenty
clients rather than one machine, as they would in production. Only the header is set; no
traffic goes anywhere but ``--host``.

The host may also come from ``ATRIUM_SCALE_OUT_URL`` (``source <run dir>/scale-out.env``).
"""

from __future__ import annotations

import itertools
import os
import random
import time
import uuid
from typing import Any

from locust import HttpUser, between, events, task

PASSWORD = "load test password 1"
ASYNC_SHARE = 0.2  # payments paid with tok_async: settled by webhook
REPLAY_SHARE = 0.1  # payment requests sent twice with the same Idempotency-Key
SETTLE_TIMEOUT = 30.0
_client_numbers = itertools.count(1)


def _client_address() -> str:
    n = next(_client_numbers)
    return f"198.18.{(n >> 8) & 0xFF}.{n & 0xFF}"


class AtriumUser(HttpUser):
    host = os.environ.get("ATRIUM_SCALE_OUT_URL")
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.base_headers = {"X-Forwarded-For": _client_address()}
        self.auth: dict[str, str] = {}
        self.item_ids: list[str] = []
        email = f"load-{uuid.uuid4().hex[:16]}@example.com"
        body = {"email": email, "password": PASSWORD, "full_name": "Load Tester", "age": 30}
        with self.client.post("/api/v1/users", json=body, headers=self.base_headers,
                              catch_response=True) as response:
            if response.status_code != 201:
                response.failure(f"sign-up: {response.status_code}")
                return
        with self.client.post("/api/v1/auth/token", data={"username": email, "password": PASSWORD},
                              headers=self.base_headers, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"log-in: {response.status_code}")
                return
            token = response.json()["access_token"]
        self.auth = {**self.base_headers, "Authorization": f"Bearer {token}"}
        self.refresh_items()

    def refresh_items(self) -> None:
        with self.client.get("/api/v1/items?limit=20", headers=self.base_headers, name="/api/v1/items",
                             catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"list items: {response.status_code}")
                return
            self.item_ids = [item["id"] for item in response.json()["items"]]
            if not self.item_ids:
                response.failure("the catalog is empty: create items first (deploy/scale-out does)")

    @task(6)
    def browse(self) -> None:
        self.refresh_items()
        for item_id in random.sample(self.item_ids, k=min(2, len(self.item_ids))):
            self.client.get(f"/api/v1/items/{item_id}", headers=self.base_headers, name="/api/v1/items/{id}")

    @task(2)
    def profile(self) -> None:
        if self.auth:
            self.client.get("/api/v1/users/me", headers=self.auth)

    @task(2)
    def buy(self) -> None:
        if not self.auth or not self.item_ids:
            return
        chosen = random.sample(self.item_ids, k=min(2, len(self.item_ids)))
        lines = [{"item_id": item_id, "quantity": random.randint(1, 3)} for item_id in chosen]
        with self.client.post("/api/v1/invoices", json={"lines": lines}, headers=self.auth,
                              catch_response=True) as response:
            if response.status_code != 201:
                response.failure(f"create invoice: {response.status_code}")
                return
            invoice_id = response.json()["id"]
        token = "tok_async" if random.random() < ASYNC_SHARE else "tok_visa"
        headers = {**self.auth, "Idempotency-Key": uuid.uuid4().hex}
        paid_at = time.monotonic()
        payment = self._pay(invoice_id, token, headers, name="/api/v1/invoices/{id}/payments")
        if payment is None:
            return
        if random.random() < REPLAY_SHARE:
            replay = self._pay(invoice_id, token, headers, name="/api/v1/invoices/{id}/payments [replay]",
                               replayed=True)
            if replay is not None and replay["id"] != payment["id"]:
                _flow_failure("replay", paid_at, f"replay answered payment {replay['id']}")
        self._wait_settled(payment, paid_at)

    def _pay(self, invoice_id: str, token: str, headers: dict[str, str], name: str,
             replayed: bool = False) -> dict[str, Any] | None:
        with self.client.post(f"/api/v1/invoices/{invoice_id}/payments", json={"payment_token": token},
                              headers=headers, name=name, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"pay: {response.status_code}")
                return None
            if replayed and response.headers.get("Idempotent-Replayed") != "true":
                response.failure("a replay without Idempotent-Replayed: true")
                return None
            result: dict[str, Any] = response.json()
            return result

    def _wait_settled(self, payment: dict[str, Any], paid_at: float) -> None:
        deadline = paid_at + SETTLE_TIMEOUT
        while payment["status"] == "pending":
            if time.monotonic() > deadline:
                _flow_failure("pay -> settled", paid_at, f"payment {payment['id']} still pending")
                return
            time.sleep(0.5)  # gevent-patched: yields to the other users
            with self.client.get(f"/api/v1/payments/{payment['id']}", headers=self.auth,
                                 name="/api/v1/payments/{id}", catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"poll payment: {response.status_code}")
                    return
                payment = response.json()
        if payment["status"] != "succeeded":
            outcome = f"payment {payment['status']}: {payment['failure_code']}"
            _flow_failure("pay -> settled", paid_at, outcome)
            return
        events.request.fire(request_type="FLOW", name="pay -> settled",
                            response_time=(time.monotonic() - paid_at) * 1000, response_length=0,
                            exception=None, context={})


def _flow_failure(name: str, started: float, message: str) -> None:
    events.request.fire(request_type="FLOW", name=name, response_time=(time.monotonic() - started) * 1000,
                        response_length=0, exception=AssertionError(message), context={})
