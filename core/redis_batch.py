"""Auto-pipelining of one Lua script: the calls made during one turn of the event loop go together.

Under load many requests reach the same Redis call in the same loop iteration (the rate limiter's
GCRA, the cache's generation-guarded read). Sent one by one, each pays redis-py's whole path: a
pooled connection checked out and back, the command packed, a write, a read, the reply parsed.
``ScriptBatcher`` queues the calls of one turn and sends them as one pipeline of ``EVALSHA``
(``transaction=False``): one write, one read, one connection for the batch.

Semantics are those of one call each: every script runs atomically on the server, in the order
the calls were made, and each caller gets its own reply (or the error of its own command). A
server that lost the script (``NOSCRIPT``: nothing ran) gets it loaded and those calls sent again.
A call alone in its turn is sent on its own. A connection or timeout error fails every call of
the batch with that error, as it would have failed each of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

_Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(
        self, client: aioredis.Redis, source: str, *, slots: asyncio.Semaphore | None = None
    ) -> None:
        self._client = client
        self._source = source
        self._script = client.register_script(source)  # EVALSHA, loaded again on NOSCRIPT
        self._slots = slots
        self._pending: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:  # the first call of this turn schedules the batch's send
            loop.call_soon(self._flush)
        self._pending.append((keys, args, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)  # a reference until it is done
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            if self._slots is None:
                results = await self._run(batch)
            else:
                async with self._slots:
                    results = await self._run(batch)
        except BaseException as exc:  # the connection failed (or the loop is closing): all fail
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (*_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _run(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:
            keys, args, _ = batch[0]
            return [await self._script(keys=list(keys), args=list(args))]
        results: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in range(2):
            pipe = self._client.pipeline(transaction=False)
            for i in todo:
                keys, args, _ = batch[i]
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            answers = await pipe.execute(raise_on_error=False)
            missing = []
            for i, answer in zip(todo, answers, strict=True):
                if isinstance(answer, NoScriptError) and attempt == 0:
                    missing.append(i)
                else:
                    results[i] = answer
            if not missing:
                break
            await self._client.script_load(self._source)
            todo = missing
        return results
