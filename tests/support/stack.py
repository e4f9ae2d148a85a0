"""The API under test as the suites see it: a ``Stack`` (app, client, mail, gateway) and ``serve``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from config import Settings
from modules.billing.adapters.gateway import GatewayEvent, GatewayLedger
from tests.support.gateway import GatewayServer

Delivery = tuple[GatewayEvent, bytes, dict[str, str]]


@dataclass
class Gateway:
    """The payment gateway behind a stack, seen from the test: its ledger and its faults."""

    ledger: GatewayLedger
    fail_next: Callable[[int], None]
    settle_pending: Callable[[], list[Delivery]]  # signed webhook deliveries, for the test to post


@dataclass
class Stack:
    profile: str
    settings: Settings
    app: FastAPI
    client: httpx.AsyncClient
    wait_for_mail: Callable[[str], Awaitable[Any]]
    mail_count: Callable[[str], int]
    gateway: Gateway
    mails: Callable[[str], list[tuple[str, str]]]  # (subject, body) of every mail to an address
    worker_log: Path | None = None
    gateway_server: GatewayServer | None = None

    @property
    def container(self) -> Any:
        return self.app.state.container


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and yield an HTTP client talking to it in-process."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://atrium.test") as client:
            yield client
