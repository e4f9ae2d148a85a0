"""``core.fastpath.redis`` against real Redis: one pipelined connection shared by every caller.

Each caller must get its own reply, whatever else is in flight; an outage must fail the callers
with redis-py's exceptions (fast), and the same object must work again once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from uuid import uuid4

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.cache.stores import CacheUnavailable, RedisCache
from core.fastpath.redis import PipelinedConnection, PipelinedScript
from core.ratelimit.limiter import RateLimiterUnavailable, RedisRateLimiter, parse_policy
from tests.support.redis_server import RedisServer, require_redis_server
from tests.support.services import REDIS_URL, require
from tests.support.smtp import free_port

pytestmark = pytest.mark.redis

# INCR a counter and append ARGV[1] to a list in one atomic step: the list shows the order scripts ran.
COUNT_AND_LOG = """
local n = redis.call('INCR', KEYS[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
return {n, ARGV[1]}
"""


def url_with_db(url: str, db: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{db}"


async def pings_then_close(connection: PipelinedConnection, count: int) -> list[object]:
    """``count`` concurrent PINGs, each reply or exception, then the connection closed."""
    try:
        return await asyncio.gather(*(connection.execute("PING") for _ in range(count)),
                                    return_exceptions=True)
    finally:
        await connection.aclose()


def server_pid(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return int(client.info("server")["process_id"])


@contextmanager
def paused(url: str) -> Iterator[None]:
    """The server at ``url`` stopped (SIGSTOP): connections are accepted by the kernel, never answered."""
    pid = server_pid(url)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of the test's own; its keys are deleted afterwards."""
    require("redis")
    name = f"atrium-test:pipe:{uuid4().hex}"
    yield name
    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(match=f"{name}:*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
async def connection() -> AsyncIterator[PipelinedConnection]:
    require("redis")
    client = aioredis.Redis.from_url(REDIS_URL)
    connection = PipelinedConnection.like(client)
    try:
        yield connection
    finally:
        await connection.aclose()
        await client.aclose()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    require_redis_server("a private server")
    with RedisServer() as server:
        yield server


# --- replies go to their callers ----------------------------------------------------------------------


async def test_500_concurrent_commands_each_get_their_own_reply(
    connection: PipelinedConnection, prefix: str
) -> None:
    await asyncio.gather(*(connection.execute("SET", f"{prefix}:s{i}", f"value-{i}") for i in range(500)))

    replies = await asyncio.gather(*(
        connection.execute(*command) for i in range(500)
        for command in (("INCRBY", f"{prefix}:n{i}", i), ("GET", f"{prefix}:s{i}"))
    ))

    assert replies[0::2] == list(range(500))
    assert replies[1::2] == [f"value-{i}".encode() for i in range(500)]


async def test_large_replies_split_over_many_reads_reach_the_right_callers(
    connection: PipelinedConnection, prefix: str
) -> None:
    values = [bytes([i]) * 100_000 for i in range(40)]
    with redis.Redis.from_url(REDIS_URL) as client:
        for i, value in enumerate(values):
            client.set(f"{prefix}:big{i}", value)

    replies = await asyncio.gather(*(connection.execute("GET", f"{prefix}:big{i}") for i in range(40)))

    assert replies == values


async def test_an_error_reply_is_returned_not_raised_and_the_others_are_unaffected(
    connection: PipelinedConnection, prefix: str
) -> None:
    await connection.execute("SET", f"{prefix}:text", "not a number")

    replies = await asyncio.gather(
        connection.execute("GET", f"{prefix}:text"),
        connection.execute("INCR", f"{prefix}:text"),
        connection.execute("INCR", f"{prefix}:counter"),
        connection.execute("NO-SUCH-COMMAND"),
        connection.execute("PING"),
    )

    assert replies[0] == b"not a number"
    assert isinstance(replies[1], ResponseError)
    assert "not an integer" in str(replies[1])
    assert replies[2] == 1
    assert isinstance(replies[3], ResponseError)
    assert replies[4] == b"PONG"


async def test_arguments_of_every_type_are_sent_as_given(
    connection: PipelinedConnection, prefix: str
) -> None:
    binary = bytes(range(256)) + b"\r\n$3\r\n"
    await asyncio.gather(
        connection.execute("SET", f"{prefix}:bytes", binary),
        connection.execute("SET", f"{prefix}:text", "h\u00e9llo \u2713"),
        connection.execute("SET", f"{prefix}:int", -42),
        connection.execute("SET", f"{prefix}:float", 2.5),
    )

    with redis.Redis.from_url(REDIS_URL) as client:
        stored = client.mget([f"{prefix}:{name}" for name in ("bytes", "text", "int", "float")])
    assert stored == [binary, "h\u00e9llo \u2713".encode(), b"-42", b"2.5"]


async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(
    connection: PipelinedConnection, prefix: str
) -> None:
    await asyncio.gather(*(connection.execute("SET", f"{prefix}:c{i}", i) for i in range(20)))
    tasks = [asyncio.ensure_future(connection.execute("GET", f"{prefix}:c{i}")) for i in range(20)]
    await asyncio.sleep(0)  # every command is queued; none has its reply yet
    tasks[7].cancel()

    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(results[7], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 7] == [str(i).encode() for i in range(20) if i != 7]
    assert await connection.execute("GET", f"{prefix}:c3") == b"3"


# --- the client's settings ---------------------------------------------------------------------------


async def test_the_database_of_the_clients_url_is_selected(prefix: str) -> None:
    client = aioredis.Redis.from_url(url_with_db(REDIS_URL, 3))
    connection = PipelinedConnection.like(client)
    key = f"{prefix}:in-db-3"
    try:
        assert await connection.execute("SET", key, "three") == b"OK"
        with redis.Redis.from_url(url_with_db(REDIS_URL, 3)) as db3, redis.Redis.from_url(REDIS_URL) as db0:
            assert db3.get(key) == b"three"
            assert db0.get(key) is None
    finally:
        await connection.aclose()
        await client.aclose()
        with redis.Redis.from_url(url_with_db(REDIS_URL, 3)) as db3:
            db3.delete(key)


@pytest.mark.slow
async def test_the_password_and_user_of_the_clients_url_are_sent(private_redis: RedisServer) -> None:
    with redis.Redis.from_url(private_redis.url) as admin:
        admin.acl_setuser("alice", enabled=True, passwords=["+alice-secret"], keys=["*"], commands=["+@all"])
        admin.config_set("requirepass", "default-secret")
    base = f"{private_redis.host}:{private_redis.port}"
    connections = {
        name: PipelinedConnection.like(aioredis.Redis.from_url(f"redis://{auth}@{base}/0"))
        for name, auth in (("password", ":default-secret"), ("user", "alice:alice-secret"),
                           ("wrong", ":not-the-secret"))
    }
    try:
        assert await connections["password"].execute("ACL", "WHOAMI") == b"default"
        assert await connections["user"].execute("ACL", "WHOAMI") == b"alice"
        with pytest.raises(RedisConnectionError, match="AUTH"):
            await connections["wrong"].execute("PING")
    finally:
        for connection in connections.values():
            await connection.aclose()


async def test_a_closed_port_fails_every_caller_with_connection_error_at_once() -> None:
    connection = PipelinedConnection("127.0.0.1", free_port(), timeout=5.0, connect_timeout=5.0)
    started = time.monotonic()
    results = await pings_then_close(connection, 5)

    assert all(isinstance(r, RedisConnectionError) for r in results), results
    assert time.monotonic() - started < 1.0


def test_a_new_event_loop_gets_a_new_connection(prefix: str) -> None:
    connection = PipelinedConnection.like(aioredis.Redis.from_url(REDIS_URL))
    key = f"{prefix}:loops"

    async def incr() -> int:
        return int(await connection.execute("INCR", key))

    async def incr_and_close() -> int:
        try:
            return await incr()
        finally:
            await connection.aclose()

    assert asyncio.run(incr()) == 1
    assert asyncio.run(incr_and_close()) == 2


# --- scripts ---------------------------------------------------------------------------------------------


async def test_a_script_is_loaded_when_the_server_lost_it_and_runs_in_call_order(
    private_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(private_redis.url)
    connection = PipelinedConnection.like(client)
    script = PipelinedScript(connection, COUNT_AND_LOG)
    keys = ("counter", "log")
    try:
        assert await script(keys, ("first",)) == [1, b"first"]  # a fresh server: loaded on NOSCRIPT
        await client.script_flush()
        assert await client.script_exists(script.sha) == [False]

        replies = await asyncio.gather(*(script(keys, (f"call-{i}",)) for i in range(200)))

        assert replies == [[i + 2, f"call-{i}".encode()] for i in range(200)]
        assert await client.lrange("log", 0, -1) == [b"first"] + [f"call-{i}".encode() for i in range(200)]
        assert await client.script_exists(script.sha) == [True]
    finally:
        await connection.aclose()
        await client.aclose()


async def test_an_error_reply_of_a_script_raises_response_error(
    connection: PipelinedConnection, prefix: str
) -> None:
    fails = PipelinedScript(connection, "return redis.error_reply('refused by the script')")
    breaks = PipelinedScript(connection, "return redis.call('INCR', KEYS[1])")
    await connection.execute("SET", f"{prefix}:text", "not a number")

    with pytest.raises(ResponseError, match="refused by the script"):
        await fails((), ())
    with pytest.raises(ResponseError, match="not an integer"):
        await breaks((f"{prefix}:text",), ())
    assert await breaks((f"{prefix}:n",), ()) == 1  # the connection is still in step


async def test_a_script_that_cannot_be_loaded_raises_response_error(connection: PipelinedConnection) -> None:
    broken = PipelinedScript(connection, "this is not lua (")

    with pytest.raises(ResponseError):
        await broken((), ())
    assert await connection.execute("PING") == b"PONG"


# --- outages ---------------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_stopped_server_fails_calls_quickly_and_the_same_connection_recovers(
    private_redis: RedisServer,
) -> None:
    connection = PipelinedConnection("127.0.0.1", private_redis.port, timeout=5.0, connect_timeout=5.0)
    try:
        assert await connection.execute("PING") == b"PONG"

        private_redis.stop()
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await connection.execute("PING")  # the connection it had is gone
        with pytest.raises(RedisConnectionError):
            await connection.execute("PING")  # and a new one is refused
        assert time.monotonic() - started < 1.0

        private_redis.start()
        assert await connection.execute("SET", "k", "back") == b"OK"
        assert await connection.execute("GET", "k") == b"back"
    finally:
        await connection.aclose()


@pytest.mark.slow
async def test_a_connection_lost_with_commands_in_flight_fails_them_all(private_redis: RedisServer) -> None:
    connection = PipelinedConnection("127.0.0.1", private_redis.port, timeout=5.0, connect_timeout=5.0)
    try:
        assert await connection.execute("PING") == b"PONG"
        pid = server_pid(private_redis.url)
        os.kill(pid, signal.SIGSTOP)  # the commands below stay unanswered...
        calls = [asyncio.ensure_future(connection.execute("INCR", "n")) for _ in range(20)]
        await asyncio.sleep(0.1)
        os.kill(pid, signal.SIGKILL)  # ...until the server dies: a lost connection, not a timeout
        started = time.monotonic()

        results = await asyncio.gather(*calls, return_exceptions=True)

        assert all(isinstance(r, RedisConnectionError) for r in results), results
        assert time.monotonic() - started < 1.0
        private_redis.restart()
        assert await connection.execute("INCR", "n") == 1
    finally:
        await connection.aclose()


@pytest.mark.slow
async def test_a_server_that_stops_answering_times_out_every_pending_call_and_recovers(
    private_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=0.3)
    connection = PipelinedConnection.like(client)
    try:
        assert await connection.execute("PING") == b"PONG"
        with paused(private_redis.url):
            started = time.monotonic()
            results = await asyncio.gather(*(connection.execute("INCR", "n") for _ in range(20)),
                                           return_exceptions=True)
            took = time.monotonic() - started
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert 0.25 <= took < 1.0
            with pytest.raises(RedisTimeoutError):  # a new connection is accepted, never answered
                await connection.execute("PING")

        assert await connection.execute("PING") == b"PONG"
        assert await connection.execute("SET", "after", "ok") == b"OK"
        assert await connection.execute("GET", "after") == b"ok"
    finally:
        await connection.aclose()
        await client.aclose()


@pytest.mark.parametrize("db", [0, 3], ids=["command", "select-handshake"])
async def test_a_server_that_never_replies_times_out(db: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as hung:  # accepts via the kernel backlog only
        connection = PipelinedConnection("127.0.0.1", hung.getsockname()[1], db=db, timeout=0.2)
        started = time.monotonic()
        results = await pings_then_close(connection, 10)
        took = time.monotonic() - started

    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert 0.15 <= took < 1.0


class DroppingProxy:
    """Closes the first ``drop`` connections as soon as it accepts them; forwards later ones to Redis.

    What a flaky network or a restarting proxy looks like: the connect succeeds, the connection is
    gone a moment later.
    """

    def __init__(self, drop: int, target: tuple[str, int] | None = None) -> None:
        self._drop = drop
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self.port: int = self._listener.getsockname()[1]

    def _accept(self) -> None:
        accepted = 0
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            accepted += 1
            if accepted <= self._drop or self._target is None:
                client.close()
                continue
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                self._threads.append(thread)
                thread.start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> DroppingProxy:
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=2)
        for sock in [self._listener, *self._sockets]:
            sock.close()


async def test_a_connection_closed_right_after_it_opened_fails_the_call_with_connection_error() -> None:
    with DroppingProxy(drop=1_000) as proxy:
        connection = PipelinedConnection("127.0.0.1", proxy.port, timeout=0.5, connect_timeout=0.5)
        outcomes: list[tuple[str, float]] = []
        try:
            for _ in range(10):
                started = time.monotonic()
                try:
                    await connection.execute("PING")
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    outcomes.append((type(exc).__name__, round(time.monotonic() - started, 2)))
        finally:
            await connection.aclose()

    assert [name for name, _ in outcomes] == ["ConnectionError"] * 10, outcomes
    assert all(took < 0.4 for _, took in outcomes), outcomes


async def test_a_call_never_gets_the_reply_of_another_after_a_dropped_connection(prefix: str) -> None:
    """The first connection is dropped as it opens; a second caller comes while the first waits."""
    wrong: list[tuple[int, object]] = []
    with redis.Redis.from_url(REDIS_URL) as client:
        client.set(f"{prefix}:a", "value-of-a")
        client.set(f"{prefix}:b", "value-of-b")
    for attempt in range(20):
        with DroppingProxy(drop=1, target=("127.0.0.1", 6379)) as proxy:
            connection = PipelinedConnection("127.0.0.1", proxy.port, timeout=0.3, connect_timeout=1.0)
            try:
                first = asyncio.ensure_future(connection.execute("GET", f"{prefix}:a"))
                await asyncio.sleep(0.05)
                second = asyncio.ensure_future(connection.execute("GET", f"{prefix}:b"))
                for task, expected in ((first, b"value-of-a"), (second, b"value-of-b")):
                    try:
                        reply = await task
                    except (RedisConnectionError, RedisTimeoutError):
                        continue  # failing is fine; answering with another key's value is not
                    if reply != expected:
                        wrong.append((attempt, reply))
            finally:
                await connection.aclose()

    assert wrong == []


# --- the adapters map these failures -------------------------------------------------------------------


async def test_the_cache_read_on_a_hung_server_raises_cache_unavailable_quickly() -> None:
    with socket.create_server(("127.0.0.1", 0)) as hung:
        cache = RedisCache.from_url(f"redis://127.0.0.1:{hung.getsockname()[1]}/0", socket_timeout=0.2)
        started = time.monotonic()
        try:
            with pytest.raises(CacheUnavailable) as caught:
                await cache.get_current("k")
        finally:
            await cache.aclose()

    assert time.monotonic() - started < 1.0
    assert isinstance(caught.value.__cause__, RedisTimeoutError)


@pytest.mark.slow
async def test_the_adapters_are_unavailable_while_redis_is_down_and_work_again_after(
    private_redis: RedisServer,
) -> None:
    cache = RedisCache.from_url(private_redis.url, namespace="atrium-test", socket_timeout=0.3)
    limiter = RedisRateLimiter.from_url(private_redis.url, namespace="atrium-test", timeout=0.3)
    policy = parse_policy("test", "100/minute")
    try:
        assert await cache.get_current("k") == (0, None)
        assert (await limiter.hit("k", policy)).allowed

        with paused(private_redis.url):
            with pytest.raises(CacheUnavailable) as cache_timeout:
                await cache.get_current("k")
            with pytest.raises(RateLimiterUnavailable) as limiter_timeout:
                await limiter.hit("k", policy)
        assert isinstance(cache_timeout.value.__cause__, RedisTimeoutError)
        assert isinstance(limiter_timeout.value.__cause__, RedisTimeoutError)

        private_redis.stop()
        with pytest.raises(CacheUnavailable) as cache_down:
            await cache.get_current("k")
        with pytest.raises(RateLimiterUnavailable) as limiter_down:
            await limiter.hit("k", policy)
        assert isinstance(cache_down.value.__cause__, RedisConnectionError)
        assert isinstance(limiter_down.value.__cause__, RedisConnectionError)

        private_redis.start()  # empty: the scripts are loaded again on NOSCRIPT
        await cache.invalidate("k")
        await cache.set_current("k", 1, b"v")
        assert await cache.get_current("k") == (1, b"v")
        decision = await limiter.hit("k", policy)
        assert decision.allowed
        assert decision.remaining == 99
    finally:
        await cache.aclose()
        await limiter.aclose()
