"""The Redis commands every request sends, on one lean pipelined connection per process.

Two calls run on the request path: the rate limiter's GCRA script (every request) and the cache's
generation-guarded read, an ``MGET`` (every cached read). Through redis-py's asyncio client each
call costs about 75 µs of CPU here (pool checkout, its retry wrapper, command packing, asyncio
streams and a RESP parser in Python: bench/README.md), as much as all of bare FastAPI's work for a
request. ``PipelinedConnection`` is the few things those two calls need, done directly:

- one TCP connection (per event loop) shared by every concurrent caller: an ``asyncio.Protocol``
  that writes the commands queued during one turn of the loop with a single ``write`` and hands
  the replies back in order (Redis answers one connection's commands in the order it got them),
  parsed by hiredis' C reader. About 15 µs per command;
- connect, ``AUTH`` and ``SELECT`` from the redis-py client's own settings (host or unix socket,
  TLS, user, password, database, timeouts), so both always talk to the same server;
- a command with no reply ``timeout`` seconds after it was sent aborts the connection and fails
  every command still waiting with ``redis.exceptions.TimeoutError`` (a late reply could no longer
  be matched to its caller); a lost connection fails them with ``ConnectionError``; the next call
  reconnects. These are redis-py's exception classes, so the adapters map them as before.

``PipelinedScript`` runs one Lua script on it with ``EVALSHA``, loading the script once on
``NOSCRIPT`` (nothing ran) and sending the call again. Every script still runs atomically on the
server, in the order of the calls. Everything else (writes, invalidation, health pings, the
broker) stays on redis-py.

In a traced request (``tracing.recording()``), each command is a CLIENT span like the redis
instrumentation's (which wraps redis-py's client and never sees this connection); in an unsampled
one, or with tracing off, none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl as ssl_module
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from opentelemetry.trace import SpanKind, Tracer
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.observability import tracing

Arg = bytes | str | int | float
_tracer: Tracer | None = None  # tracing on: the tracer of this module's spans, made on first use


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = repr(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Protocol(asyncio.Protocol):
    """Replies are matched to waiters in order; a waiter is ``[deadline, future]``."""

    def __init__(self, owner: PipelinedConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader(replyError=ResponseError, notEnoughData=False)
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiters = self._owner._waiters
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if not waiters:  # a reply nobody asked for: the stream can't be trusted any more
                self._owner._abort(RedisConnectionError("unexpected reply from Redis"))
                return
            future = waiters.popleft()[1]
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._owner._lost(self, exc)


class PipelinedConnection:
    """One pipelined connection to Redis, (re)opened on first use in the running event loop."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl: ssl_module.SSLContext | None = None,
        timeout: float = 1.0,
        connect_timeout: float = 1.0,
    ) -> None:
        self._address = path or f"{host}:{port}"
        self._host, self._port, self._path = host, port, path
        self._db, self._username, self._password, self._ssl = db, username, password, ssl
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[None] | None = None
        self._opening: asyncio.Task[None] | None = None
        self._waiters: deque[list[Any]] = deque()
        self._outgoing: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    def like(cls, client: aioredis.Redis, *, timeout: float | None = None) -> PipelinedConnection:
        """A connection to the server ``client`` talks to, with its credentials and timeouts."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        command_timeout = timeout or kwargs.get("socket_timeout") or 1.0
        unix = issubclass(pool.connection_class, UnixDomainSocketConnection)
        ssl = None
        if issubclass(pool.connection_class, SSLConnection):
            ssl = ssl_module.create_default_context(cafile=kwargs.get("ssl_ca_certs"))
            if kwargs.get("ssl_cert_reqs") in ("none", ssl_module.CERT_NONE):
                ssl.check_hostname = False
                ssl.verify_mode = ssl_module.CERT_NONE
        return cls(
            kwargs.get("host", "127.0.0.1"),
            int(kwargs.get("port", 6379)),
            path=kwargs.get("path") if unix else None,
            db=int(kwargs.get("db") or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            ssl=ssl,
            timeout=command_timeout,
            connect_timeout=kwargs.get("socket_connect_timeout") or command_timeout,
        )

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply; an error reply is returned, not raised."""
        if tracing.recording():
            return await self._traced(args)
        return await self._execute(args)

    async def _traced(self, args: Sequence[Arg]) -> Any:
        """``_execute`` in a CLIENT span shaped as the redis instrumentation's (which never sees
        this connection: it wraps redis-py's client): the command as name, its arguments as ``?``."""
        global _tracer
        if _tracer is None:
            _tracer = tracing.tracer(__name__)
        command = str(args[0]) if args else "redis"
        attributes: dict[str, str | int] = {
            "db.system": "redis", "db.statement": " ".join([command, *("?" * (len(args) - 1))]),
            "db.redis.database_index": self._db, "db.redis.args_length": len(args),
        }
        if self._path:
            attributes.update({"net.peer.name": self._path, "net.transport": "unix"})
        else:
            attributes.update({"net.peer.name": self._host, "net.peer.port": self._port})
        with _tracer.start_as_current_span(command, kind=SpanKind.CLIENT, attributes=attributes):
            return await self._execute(args)

    async def _execute(self, args: Sequence[Arg]) -> Any:
        protocol = self._protocol
        loop = asyncio.get_running_loop()
        if protocol is None or protocol.lost or self._loop is not loop:
            await self._connect(loop)
            protocol = self._protocol
            if protocol is None or protocol.lost:  # dropped again before this caller resumed
                raise RedisConnectionError(f"Connection to Redis at {self._address} lost")
        future = loop.create_future()
        self._queue(pack(args), future, loop)
        return await future

    def _queue(self, data: bytes, future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(data)
        self._waiters.append([loop.time() + self._timeout, future])
        if self._timer is None:
            self._timer = loop.call_at(self._waiters[0][0], self._check_deadline)

    def _flush(self) -> None:
        data, self._outgoing = self._outgoing, []
        protocol = self._protocol
        if data and protocol is not None and protocol.transport is not None and not protocol.lost:
            protocol.transport.write(b"".join(data))

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiters or self._loop is None:
            return
        deadline = self._waiters[0][0]
        if deadline <= self._loop.time():
            self._abort(RedisTimeoutError(f"Timeout reading from Redis at {self._address}"))
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:  # first use, or a new event loop (tests): start afresh
            old = self._protocol
            self._drop(RedisConnectionError("the event loop changed"))
            if old is not None and old.transport is not None:
                with contextlib.suppress(Exception):  # its loop may be closed already
                    old.transport.abort()
            self._loop = loop
        if self._connecting is None:
            self._connecting = loop.create_future()
            # A task of its own, so a caller cancelled while connecting doesn't cancel the others'.
            self._opening = loop.create_task(self._open(loop, self._connecting))
        await asyncio.shield(self._connecting)

    async def _open(self, loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
        try:
            protocol = await asyncio.wait_for(self._create(loop), self._connect_timeout)
            self._protocol = protocol
            handshake: list[tuple[str | int, ...]] = []
            if self._password:
                handshake.append(("AUTH", self._username, self._password) if self._username
                                 else ("AUTH", self._password))
            if self._db:
                handshake.append(("SELECT", self._db))
            for command in handshake:
                future = loop.create_future()
                self._queue(pack([c for c in command if c is not None]), future, loop)
                reply = await future
                if isinstance(reply, ResponseError):
                    self._abort(RedisConnectionError(f"Redis refused {command[0]}: {reply}"))
                    raise RedisConnectionError(f"Redis refused {command[0]}: {reply}")
            done.set_result(None)
        except TimeoutError:
            done.set_exception(RedisTimeoutError(f"Timeout connecting to Redis at {self._address}"))
        except OSError as exc:
            done.set_exception(RedisConnectionError(f"Error connecting to Redis at {self._address}: {exc}"))
        except Exception as exc:
            done.set_exception(exc)
        finally:
            self._connecting = None

    async def _create(self, loop: asyncio.AbstractEventLoop) -> _Protocol:
        if self._path is not None:
            _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
        else:
            _, protocol = await loop.create_connection(
                lambda: _Protocol(self), self._host, self._port, ssl=self._ssl,
                server_hostname=self._host if self._ssl is not None else None,
            )
        return protocol

    def _lost(self, protocol: _Protocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            reason = f": {exc}" if exc else ""
            self._drop(RedisConnectionError(f"Connection to Redis at {self._address} lost{reason}"))

    def _abort(self, exc: Exception) -> None:
        protocol = self._protocol
        self._drop(exc)
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    def _drop(self, exc: Exception) -> None:
        """Forget the connection; every command still waiting fails with ``exc``."""
        self._protocol = None
        self._outgoing = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, deque()
        for _, future in waiters:
            if not future.done():
                future.set_exception(exc)

    async def aclose(self) -> None:
        protocol = self._protocol
        self._drop(RedisConnectionError("the connection was closed"))
        if protocol is not None and protocol.transport is not None:
            protocol.transport.close()


class PipelinedScript:
    """A Lua script run with ``EVALSHA`` on a ``PipelinedConnection``; loaded on ``NOSCRIPT``."""

    def __init__(self, connection: PipelinedConnection, source: str) -> None:
        self._connection = connection
        self._source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        execute = self._connection.execute
        reply = await execute("EVALSHA", self.sha, len(keys), *keys, *args)
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            loaded = await execute("SCRIPT", "LOAD", self._source)
            if isinstance(loaded, ResponseError):
                raise loaded
            reply = await execute("EVALSHA", self.sha, len(keys), *keys, *args)
        if isinstance(reply, ResponseError):
            raise reply
        return reply
