"""``core.messaging.periodic``: declaring a periodic job, and the runner's loop."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from core.messaging.periodic import Periodic, PeriodicContext, PeriodicRunner, periodic


def _job(name: str, every: str, fn: Any) -> Periodic:
    return periodic(name, every=every)(fn)


class TestDeclare:
    def test_names_follow_the_task_rule(self) -> None:
        async def run(ctx: PeriodicContext) -> None: ...

        assert _job("billing.reconcile_payments", "x", run).module == "billing"
        with pytest.raises(ValueError, match="snake_case"):
            _job("Reconcile", "x", run)

    def test_the_function_takes_only_the_context(self) -> None:
        async def two(ctx: PeriodicContext, extra: int) -> None: ...

        with pytest.raises(TypeError, match="PeriodicContext"):
            _job("billing.sweep", "x", two)


class TestRunner:
    def test_the_interval_setting_must_be_a_positive_number(self) -> None:
        async def run(ctx: PeriodicContext) -> None: ...

        job = _job("billing.sweep", "sweep_seconds", run)
        with pytest.raises(ValueError, match="sweep_seconds"):
            PeriodicRunner(None, {}, [job], SimpleNamespace())  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="sweep_seconds"):
            PeriodicRunner(None, {}, [job], SimpleNamespace(sweep_seconds=0))  # type: ignore[arg-type]

    async def test_runs_every_interval_with_its_module_container_and_survives_a_failure(self) -> None:
        seen: list[Any] = []

        async def run(ctx: PeriodicContext) -> None:
            seen.append(ctx.container)
            if len(seen) == 1:
                raise RuntimeError("first run fails")

        runner = PeriodicRunner(None, {"billing": "billing's container"},  # type: ignore[arg-type]
                                [_job("billing.sweep", "sweep_seconds", run)],
                                SimpleNamespace(sweep_seconds=0.02))
        assert runner.names == ["billing.sweep"]
        runner.start()
        try:
            for _ in range(200):
                if len(seen) >= 3:
                    break
                await asyncio.sleep(0.01)
        finally:
            await runner.stop()
        assert seen[:3] == ["billing's container"] * 3
        count = len(seen)
        await asyncio.sleep(0.06)
        assert len(seen) == count  # stopped
