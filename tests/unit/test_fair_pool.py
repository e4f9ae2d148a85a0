"""core.fastpath.pool: waiting checkouts are served in arrival order, and nothing is lost on the way."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.util.concurrency import greenlet_spawn
from sqlalchemy.util.queue import Empty

from core.db.engine import create_engine
from core.fastpath.pool import FairQueue, FairQueuePool


async def get(queue: FairQueue[Any], wait: float | None = None) -> Any:
    """``queue.get`` as the pool calls it: from greenlet-run code, ``wait`` its timeout."""
    return await greenlet_spawn(queue.get, True, wait)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_idle_items_are_taken_at_once_fifo_and_lifo() -> None:
    fifo, lifo = FairQueue[int](3), FairQueue[int](3, use_lifo=True)
    for n in (1, 2, 3):
        fifo.put_nowait(n)
        lifo.put_nowait(n)
    assert fifo.full()
    assert fifo.qsize() == 3
    assert [await get(fifo) for _ in range(3)] == [1, 2, 3]
    assert [await get(lifo) for _ in range(3)] == [3, 2, 1]
    assert fifo.empty()


async def test_waiters_are_served_in_arrival_order() -> None:
    queue = FairQueue[str](2)
    order: list[tuple[int, str]] = []

    async def checkout(n: int) -> None:
        order.append((n, await get(queue)))

    tasks = []
    for n in range(5):
        tasks.append(asyncio.create_task(checkout(n)))
        await settle()  # each waiter is queued before the next arrives
    for item in "abcde":
        queue.put_nowait(item)
    await asyncio.gather(*tasks)
    assert order == [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")]
    assert queue.empty()


async def test_a_returned_item_goes_to_the_waiter_not_to_a_newcomer() -> None:
    queue = FairQueue[str](1)
    waiter = asyncio.create_task(get(queue))
    await settle()
    queue.put_nowait("conn")  # handed to the waiter, not left idle
    assert queue.empty()
    with pytest.raises(Empty):
        queue.get(block=False)  # the newcomer finds nothing to take
    assert await waiter == "conn"


async def test_a_timed_out_waiter_leaves_the_line() -> None:
    queue = FairQueue[str](1)
    with pytest.raises(Empty):
        await get(queue, wait=0.01)
    queue.put_nowait("conn")  # nobody waits any more: it stays idle
    assert queue.qsize() == 1
    assert await get(queue) == "conn"


async def test_a_cancelled_waiter_leaves_the_line() -> None:
    queue = FairQueue[str](1)
    first = asyncio.create_task(get(queue))
    second = asyncio.create_task(get(queue))
    await settle()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    queue.put_nowait("conn")
    assert await second == "conn"


async def test_an_item_handed_over_as_its_waiter_is_cancelled_is_passed_on() -> None:
    queue = FairQueue[str](1)
    first = asyncio.create_task(get(queue))
    second = asyncio.create_task(get(queue))
    await settle()
    queue.put_nowait("conn")  # handed to the first waiter...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == "conn"  # the connection was not lost with it


async def test_put_beyond_maxsize_raises_full() -> None:
    from sqlalchemy.util.queue import Full

    queue = FairQueue[int](1)
    queue.put_nowait(1)
    with pytest.raises(Full):
        queue.put(2)


async def test_postgres_checkouts_beyond_the_pool_are_served_in_arrival_order(postgres_url: str) -> None:
    engine = create_engine(postgres_url, pool_size=2, max_overflow=0, pool_timeout=10, fast_path=True)
    assert isinstance(engine.sync_engine.pool, FairQueuePool)
    order: list[int] = []

    async def use(n: int, hold: float) -> None:
        async with engine.connect() as connection:
            order.append(n)
            await connection.execute(text("SELECT pg_sleep(:s)"), {"s": hold})

    try:
        holders = [asyncio.create_task(use(n, 0.2)) for n in (0, 1)]
        await asyncio.sleep(0.1)  # both connections are out
        waiters = []
        for n in range(2, 8):
            waiters.append(asyncio.create_task(use(n, 0.0)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*holders, *waiters)
        assert sorted(order[:2]) == [0, 1]  # the two holders open their connections concurrently
        assert order[2:] == list(range(2, 8))
        assert engine.sync_engine.pool.checkedout() == 0
    finally:
        await engine.dispose()


async def test_postgres_pool_timeout_still_applies(postgres_url: str) -> None:
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    engine = create_engine(postgres_url, pool_size=1, max_overflow=0, pool_timeout=0.2, fast_path=True)
    try:
        async with engine.connect():
            with pytest.raises(PoolTimeout):
                async with engine.connect():
                    pass
        async with engine.connect() as connection:  # the timed-out waiter did not keep a turn
            assert (await connection.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()
