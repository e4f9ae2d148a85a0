"""Modules per process: an API serving some modules' routes, a worker running some modules' actors.

``ATRIUM_MODULES`` stays the list that is loaded (providers, facades, the outbox routing table);
``ATRIUM_API_MODULES`` / ``ATRIUM_WORKER_MODULES`` only narrow what this process serves.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import main
from config import ConfigError, load_settings
from containers import build_container
from core.db.session import UnitOfWork
from core.messaging.events import IntegrationEvent
from core.messaging.outbox import Outbox, OutboxMessage
from core.module import ModuleError, load_modules, select_modules
from modules.billing.public import PaymentSucceeded
from modules.users.public import UserRegistered
from tests.support.db import migrated
from tests.support.settings import make_settings

NS = make_settings().broker_namespace


@pytest.fixture
def no_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``load_settings()`` reads ``.env`` in the working directory: run from one without it, so a
    developer's ``.env`` (README "Add a module" writes ATRIUM_MODULES there) changes nothing."""
    monkeypatch.chdir(tmp_path)


# --- settings -----------------------------------------------------------------------------------------


def test_process_modules_default_to_everything() -> None:
    settings = make_settings()

    assert settings.api_modules == ()
    assert settings.worker_modules == ()
    modules = load_modules(settings.modules)
    assert select_modules(modules, settings.worker_modules, "ATRIUM_WORKER_MODULES") == modules


def test_process_modules_are_read_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, no_dotenv: None,
) -> None:
    monkeypatch.setenv("ATRIUM_API_MODULES", "users, items")
    monkeypatch.setenv("ATRIUM_WORKER_MODULES", "billing")

    settings = load_settings(env="test")

    assert settings.api_modules == ("users", "items")
    assert settings.worker_modules == ("billing",)


@pytest.mark.parametrize(("field", "setting"), [("api_modules", "API_MODULES"),
                                                 ("worker_modules", "WORKER_MODULES")])
def test_a_process_module_must_be_enabled(field: str, setting: str, no_dotenv: None) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env="test", modules="users,items", **{field: "items,billing"})

    assert str(caught.value) == (
        f"ATRIUM_{setting}: module 'billing' is not enabled (ATRIUM_MODULES=users,items)")


def test_dependencies_of_a_process_module_must_be_enabled() -> None:
    """billing alone in ATRIUM_MODULES: the start-up check names what is missing."""
    settings = make_settings(modules=("items", "billing"), worker_modules=("billing",))

    with pytest.raises(ModuleError, match="module 'billing' depends on 'users', which is not enabled"):
        load_modules(settings.modules)


def test_selecting_a_module_that_is_not_loaded_is_refused() -> None:
    modules = load_modules(["users", "items"])

    with pytest.raises(ModuleError) as caught:
        select_modules(modules, ["billing"], "ATRIUM_WORKER_MODULES")

    assert str(caught.value) == (
        "ATRIUM_WORKER_MODULES: module 'billing' is not enabled (ATRIUM_MODULES=users,items)")


# --- the API ------------------------------------------------------------------------------------------


def paths(app: Any) -> set[str]:
    return {p for p in app.openapi()["paths"] if p.startswith(main.API_PREFIX)}


def test_an_api_serves_only_its_modules_routes_and_keeps_the_others_loaded() -> None:
    app = main.create_app(make_settings(api_modules=("users", "items")))

    served = paths(app)
    assert "/api/v1/users" in served
    assert "/api/v1/items" in served
    assert not any(p.startswith(("/api/v1/invoices", "/api/v1/payments")) for p in served)
    assert "billing" in app.state.container.providers  # billing's providers are still there
    assert [m.name for m in app.state.modules] == ["users", "items", "billing"]
    assert "/health/live" in app.openapi()["paths"]


def test_an_api_serves_every_enabled_module_by_default() -> None:
    assert "/api/v1/invoices" in paths(main.create_app(make_settings()))


# --- the outbox relay routes every enabled module --------------------------------------------------


@pytest.fixture(scope="module")
async def relay_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    return await migrated(f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('relay') / 'atrium.db'}")


@pytest.fixture
async def container_for(relay_database: str) -> AsyncIterator[Any]:
    built: list[Any] = []

    def make(**overrides: Any) -> Any:
        container = build_container(make_settings(database_url=relay_database, **overrides))
        built.append(container)
        return container

    yield make
    for container in built:
        await container.engine().dispose()


async def relay_rows(container: Any, rows: list[tuple[str, Any]]) -> list[OutboxMessage]:
    """Write jobs ``(task name, payload)`` and events ``(event name, event)``, relay, return the rows."""
    outbox, sessions = Outbox(), container.sessions()
    async with sessions() as session:
        before = set((await session.scalars(select(OutboxMessage.id))).all())
    async with UnitOfWork(sessions) as session:
        for name, payload in rows:
            if isinstance(payload, IntegrationEvent):
                outbox.publish(session, payload)
            else:
                outbox.enqueue(session, name, payload)
    container.jobs()  # declares the actors of every enabled module on the broker
    relay = container.relay()
    while await relay.relay_once():
        pass
    async with sessions() as session:
        found = (await session.scalars(select(OutboxMessage).order_by(OutboxMessage.created_at))).all()
    return [row for row in found if row.id not in before]


def queued(container: Any, module: str) -> list[str]:
    """Actor names of the messages waiting on a module's queue of the (stub) broker."""
    import json

    broker = container.broker()
    pending = list(broker.queues[f"{NS}.{module}"].queue)
    return [json.loads(raw)["actor_name"] for raw in pending]


async def test_an_api_without_billing_routes_still_relays_billing_jobs_and_events(container_for: Any) -> None:
    container = container_for(api_modules=("users", "items"))
    event = PaymentSucceeded(payment_id=uuid.uuid4(), invoice_id=uuid.uuid4(), user_id=uuid.uuid4(),
                             amount=100, currency="EUR")

    rows = await relay_rows(container, [("billing.charge_payment", {"payment_id": str(uuid.uuid4())}),
                                        (event.name, event)])

    assert sorted((r.name, r.published_at is not None, r.parked_at) for r in rows) == [
        ("billing.PaymentSucceeded", True, None), ("billing.charge_payment", True, None),
    ]
    assert sorted(queued(container, "billing")) == ["billing.charge_payment", "billing.send_receipt"]


async def test_a_billing_only_worker_does_not_park_the_users_jobs(container_for: Any) -> None:
    container = container_for(worker_modules=("billing",))
    event = UserRegistered(user_id=uuid.uuid4(), email="ada@example.com", full_name="Ada")

    rows = await relay_rows(container, [("users.send_welcome_email", event.model_dump(mode="json")),
                                        (event.name, event)])

    assert [(r.published_at is not None, r.parked_at, r.last_error) for r in rows] == [(True, None, None)] * 2
    assert queued(container, "users") == ["users.send_welcome_email", "users.send_welcome_email"]


# --- the worker ---------------------------------------------------------------------------------------


def test_a_billing_only_worker_consumes_only_the_billing_queue(tmp_path: Path) -> None:
    settings = make_settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/w.db", worker_modules=("billing",))
    modules = load_modules(settings.modules)
    container = build_container(settings, modules)
    jobs, broker = container.jobs(), container.broker()
    running = select_modules(modules, settings.worker_modules, "ATRIUM_WORKER_MODULES")

    assert main.actor_queues(jobs, running) == {f"{NS}.billing"}
    assert {"users.send_welcome_email", "billing.charge_payment"} <= set(broker.actors)  # still routable
    worker = main.start_worker(broker, jobs, running, threads=1)
    try:
        consumed = set(worker.consumers)
    finally:
        worker.stop()

    assert consumed == {f"{NS}.billing", f"{NS}.billing.DQ"}


def test_a_worker_for_modules_without_actors_starts_no_consumer() -> None:
    """An empty queue list would mean "every queue" to dramatiq: the worker is not started at all."""
    settings = make_settings(worker_modules=("items",))
    modules = load_modules(settings.modules)
    container = build_container(settings, modules)

    running = select_modules(modules, settings.worker_modules, "ATRIUM_WORKER_MODULES")

    assert main.actor_queues(container.jobs(), running) == set()
    assert main.start_worker(container.broker(), container.jobs(), running, threads=1) is None
