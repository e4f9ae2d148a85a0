"""Waiting for something to happen (or to keep holding) without fixed sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    """Poll ``check`` (sync or async) until it is true; fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def holds_for(check: Callable[[], bool], seconds: float) -> None:
    """Assert that ``check`` stays true for ``seconds`` (e.g. no second mail arrives late)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        assert check(), "the condition stopped holding"
        await asyncio.sleep(0.05)
    assert check(), "the condition stopped holding"
