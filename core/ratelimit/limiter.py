"""Rate limiting: a ``RateLimiter`` port (memory, Redis, off), the HTTP middleware and the login guard.

Algorithm: GCRA (the generic cell rate algorithm, a leaky bucket kept as one timestamp). A policy
``N/period`` lets a key spend ``N`` requests at once and earns one back every ``period / N``; the
only state per key is its *theoretical arrival time* (TAT), an integer of microseconds, which
expires from Redis as soon as the bucket is full again, so nothing outlives its window. A
refused hit changes nothing. All arithmetic is on integers, so ``N`` hits in a burst are allowed
and hit ``N + 1`` is refused on every adapter, exactly.

- ``MemoryRateLimiter`` keeps the TATs in a dict; ``hit`` never awaits, so it is atomic under
  asyncio. One process only: development and tests.
- ``RedisRateLimiter`` runs one Lua script per hit (read, decide, write: atomic on the server) and
  takes the time from the server (``TIME``), so API processes on different hosts share one clock.
- ``NullRateLimiter`` is the limiter turned off.

A backend that cannot be reached raises ``RateLimiterUnavailable``; ``RateLimits`` decides what
that means (general limits fail open, login fails closed, both settings).

HTTP: ``RateLimitMiddleware`` (pure ASGI, one limiter call per request) applies the route group's
policy per user (valid bearer token) or per client (IP; ``X-Forwarded-For`` only from
``trusted_proxies``) and adds ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset``
to the response; a refusal is a 429 ``rate_limited`` envelope with ``Retry-After``.
``LoginRateLimit`` is a route dependency adding the stricter per-client and per-account login
policies before the password is checked; the headers then show the strictest decision.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import orjson
import redis.asyncio as aioredis
from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordRequestForm
from loguru import logger
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.edge.errors import AppError
from core.edge.provided import Provided
from core.security import InvalidToken, TokenService

__all__ = [
    "Decision",
    "LoginRateLimit",
    "MemoryRateLimiter",
    "NullRateLimiter",
    "Policy",
    "RateLimitMiddleware",
    "RateLimited",
    "RateLimiter",
    "RateLimiterDown",
    "RateLimiterUnavailable",
    "RateLimits",
    "RedisRateLimiter",
    "parse_policy",
]

_MICROS = 1_000_000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}  # by the unit's first letter
_SPEC = re.compile(r"\s*(\d+)\s*/\s*(seconds?|minutes?|hours?|days?|[smhd])\s*", re.IGNORECASE)

# Groups the login guard uses; ``default`` is every route no prefix maps elsewhere.
DEFAULT_GROUP, AUTH_CLIENT, AUTH_ACCOUNT = "default", "auth_client", "auth_account"


class RateLimiterUnavailable(Exception):
    """The limiter's backend could not be reached or refused the command."""


@dataclass(frozen=True, slots=True)
class Policy:
    """``limit`` requests per ``period`` seconds, for the route group ``name``."""

    name: str
    limit: int
    period: float
    # Microseconds to earn one request back (rounded up: never more than ``limit`` per period),
    # and the bucket's depth in microseconds; computed once here, used on every hit.
    interval_us: int = field(init=False, repr=False, compare=False)
    period_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.limit < 1 or not self.period > 0:
            raise ValueError(f"a rate limit needs a count and period above 0: {self.limit}/{self.period}s")
        interval = -(-round(self.period * _MICROS) // self.limit)
        object.__setattr__(self, "interval_us", interval)
        object.__setattr__(self, "period_us", interval * self.limit)


def parse_policy(name: str, spec: str) -> Policy:
    """``"30/minute"`` -> ``Policy(name, 30, 60.0)``; units: second, minute, hour, day (or s, m, h, d)."""
    match = _SPEC.fullmatch(spec) if isinstance(spec, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"{name}={spec!r} is not N/second|minute|hour|day with N >= 1")
    return Policy(name, int(match.group(1)), float(_UNITS[match.group(2)[0].lower()]))


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one hit. ``reset_after``: seconds until the full quota is back;
    ``retry_after``: seconds until the next hit would be allowed (0 when this one was)."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float


class RateLimiter(Protocol):
    async def hit(self, key: str, policy: Policy) -> Decision:
        """Count one request for ``key`` under ``policy`` unless that would exceed it."""
        ...

    async def ping(self) -> None: ...
    async def aclose(self) -> None: ...


def _gcra(tat: int | None, now: int, policy: Policy) -> tuple[Decision, int | None]:
    """The decision and the new TAT to store (``None``: store nothing). Mirrors ``_GCRA_LUA``."""
    interval, period = policy.interval_us, policy.period_us
    if tat is None or tat < now:
        tat = now
    allow_at = tat + interval - period
    if now < allow_at:
        return Decision(False, policy.limit, 0, (tat - now) / _MICROS, (allow_at - now) / _MICROS), None
    new_tat = tat + interval
    remaining = (period - (new_tat - now)) // interval
    return Decision(True, policy.limit, remaining, (new_tat - now) / _MICROS, 0.0), new_tat


class MemoryRateLimiter:
    """In-process GCRA. ``hit`` has no ``await`` inside, so concurrent tasks can't interleave in it.

    At most ``max_keys`` keys are kept: finished ones (bucket full again) are swept once a minute
    and whenever the cap is passed; if that is not enough the oldest keys are forgotten.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._max_keys = max_keys
        self._tats: dict[str, int] = {}
        self._next_sweep = 0

    def __len__(self) -> int:
        return len(self._tats)

    async def hit(self, key: str, policy: Policy) -> Decision:
        now = int(self._clock() * _MICROS)
        decision, new_tat = _gcra(self._tats.get(key), now, policy)
        if new_tat is not None:
            self._tats[key] = new_tat
            if len(self._tats) > self._max_keys or now >= self._next_sweep:
                self._sweep(now)
        return decision

    def _sweep(self, now: int) -> None:
        self._next_sweep = now + 60 * _MICROS
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        excess = len(self._tats) - self._max_keys
        if excess > 0:
            for key in list(self._tats)[: excess + self._max_keys // 10]:
                del self._tats[key]

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        self._tats.clear()


class NullRateLimiter:
    """Rate limiting turned off: every hit is allowed (``RateLimits`` then adds no headers)."""

    async def hit(self, key: str, policy: Policy) -> Decision:
        return Decision(True, policy.limit, policy.limit, 0.0, 0.0)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# KEYS[1] = the key's TAT; ARGV = interval µs, period µs. Returns allowed, remaining, reset µs,
# retry µs (integers). Time is the server's, so every API process shares one clock. Redis passes
# Lua numbers to commands with full precision (TATs are ~1.7e15 µs, exact in a double).
_GCRA_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then
    tat = now
end
local allow_at = tat + interval - period
if now < allow_at then
    return {0, 0, tat - now, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((period - (new_tat - now)) / interval), new_tat - now, 0}
"""


@contextmanager
def _unavailable_on_error() -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise RateLimiterUnavailable(f"redis rate limiter error: {exc}") from exc


class RedisRateLimiter:
    """GCRA in one Lua script per hit; keys are ``f"{namespace}:rl:{key}"`` with a TTL of their window.

    With the fast path, hits go through one lean pipelined connection (``core.fastpath.redis``), not
    redis-py's pool: the hits made during one turn of the event loop leave in one write, and each
    script still runs atomically on the server and in order, so the decisions are exactly those of
    one call per hit.
    ``client`` (redis-py) serves the health ping and names the server, credentials and timeouts.
    """

    def __init__(self, client: aioredis.Redis, namespace: str = "atrium", *, pipelined: bool = False) -> None:
        self._client = client
        self.namespace = namespace
        self._prefix = f"{namespace}:rl:"
        self._fast: Any = None
        self._gcra: Callable[[Sequence[str], Sequence[int]], Awaitable[Any]]
        if pipelined:
            from core.fastpath.redis import PipelinedConnection, PipelinedScript

            self._fast = PipelinedConnection.like(client)
            self._gcra = PipelinedScript(self._fast, _GCRA_LUA)
        else:
            script = client.register_script(_GCRA_LUA)
            self._gcra = lambda keys, args: script(keys=keys, args=args)

    @classmethod
    def from_url(
        cls, url: str, namespace: str = "atrium", *, timeout: float = 1.0, max_connections: int = 1024,
        pipelined: bool = False,
    ) -> RedisRateLimiter:
        """``timeout`` bounds connecting and each command. It is wall-clock on the event loop, so a
        loop busy with a burst of requests eats into it: it is longer than the cache's, and
        ``RateLimits`` stops asking a failing limiter for a while anyway. ``max_connections`` is
        redis-py's pool bound, which the stock path reaches with one connection per concurrent
        hit (the fast path's pipelined connection is one per process)."""
        client = aioredis.Redis.from_url(
            url, max_connections=max_connections,
            socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30,
        )
        return cls(client, namespace=namespace, pipelined=pipelined)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def key(self, key: str) -> str:
        """The Redis key holding ``key``'s state."""
        return self._prefix + key

    async def hit(self, key: str, policy: Policy) -> Decision:
        with _unavailable_on_error():
            allowed, remaining, reset_us, retry_us = await self._gcra(
                (self._prefix + key,), (policy.interval_us, policy.period_us)
            )
        return Decision(bool(allowed), policy.limit, int(remaining), reset_us / _MICROS, retry_us / _MICROS)

    async def ping(self) -> None:
        with _unavailable_on_error():
            await self._client.ping()

    async def aclose(self) -> None:
        if self._fast is not None:
            await self._fast.aclose()
        await self._client.aclose()


# --- HTTP ------------------------------------------------------------------------------------------

_SLOT = "atrium.rate_limit"  # scope key: the decision whose headers the response will carry
_JSON = (b"content-type", b"application/json")
_EXEMPT = ("/health/", "/metrics")


class RateLimited(AppError):
    status, code = 429, "rate_limited"

    def __init__(self, decision: Decision, headers: Mapping[str, str]) -> None:
        retry = _retry_seconds(decision)
        super().__init__(
            f"Too many requests; retry in {retry} s.", details={"limit": decision.limit, "retry_after": retry}
        )
        self.headers = dict(headers)


class RateLimiterDown(AppError):
    status, code = 503, "rate_limiter_unavailable"
    headers = {"Retry-After": "1"}


def _retry_seconds(decision: Decision) -> int:
    return max(1, math.ceil(decision.retry_after))


def _header_values(decision: Decision) -> list[tuple[bytes, bytes]]:
    return [
        (b"ratelimit-limit", b"%d" % decision.limit),
        (b"ratelimit-remaining", b"%d" % decision.remaining),
        (b"ratelimit-reset", b"%d" % math.ceil(decision.reset_after)),
    ]


def _stricter(current: Decision | None, other: Decision) -> Decision:
    """Of two decisions for one request, the one its headers should show."""
    if current is None or current.allowed != other.allowed:
        return other if current is None or not other.allowed else current
    if not current.allowed:
        return current if current.retry_after >= other.retry_after else other
    if current.remaining != other.remaining:
        return current if current.remaining < other.remaining else other
    return current if current.reset_after >= other.reset_after else other


class _Slot:
    __slots__ = ("decision",)

    def __init__(self, decision: Decision) -> None:
        self.decision = decision


class RateLimits:
    """The policies of one app: which applies to a path, who the caller is, what an outage means.

    ``rate_limits`` maps group names to specs (``"600/minute"``); ``groups`` maps path prefixes
    to a group (the longest prefix wins, anything else is ``default``; the group ``none`` exempts
    a prefix; ``/health/`` and ``/metrics`` are always exempt). After a backend failure the limiter
    is not asked again for ``cooloff`` seconds, so an outage costs one timeout, not one per request.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        rate_limits: Mapping[str, str],
        groups: Mapping[str, str] | None = None,
        *,
        tokens: TokenService,
        registry: CollectorRegistry,
        trusted_proxies: Iterable[str] = (),
        fail_open: bool = True,
        login_fail_open: bool = False,
        cooloff: float = 1.0,
    ) -> None:
        self.limiter = limiter
        self.enabled = not isinstance(limiter, NullRateLimiter)
        self.policies = {name: parse_policy(name, spec) for name, spec in rate_limits.items()}
        missing = {DEFAULT_GROUP, AUTH_CLIENT, AUTH_ACCOUNT} - set(self.policies)
        if missing:
            raise ValueError(f"rate limits lack the groups {sorted(missing)}")
        self.default = self.policies[DEFAULT_GROUP]
        routes: list[tuple[str, Policy | None]] = [(prefix, None) for prefix in _EXEMPT]
        for prefix, group in (groups or {}).items():
            routes.append((prefix, None if group == "none" else self.policies[group]))
        self._routes = sorted(routes, key=lambda route: len(route[0]), reverse=True)
        self._tokens = tokens
        self._users: dict[bytes, tuple[str, float]] = {}
        self._trusted = tuple(ipaddress.ip_network(p, strict=False) for p in trusted_proxies)
        self._trusted_cache: dict[str, bool] = {}
        self.fail_open = fail_open
        self.login_fail_open = login_fail_open
        self._cooloff = cooloff
        self._down_until = 0.0
        counter = Counter(
            "atrium_rate_limited", "Requests refused by a rate limit, by policy group.", ["group"],
            registry=registry,
        )
        self._rejected = {name: counter.labels(name) for name in self.policies}

    # -- who and what ---------------------------------------------------------------------------

    def policy_for(self, path: str) -> Policy | None:
        for prefix, policy in self._routes:
            if path.startswith(prefix):
                return policy
        return self.default

    def subject(self, scope: Scope) -> str:
        """``u:<user id>`` for a valid bearer token, else ``c:<client ip>``."""
        authorization = forwarded = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-forwarded-for":
                forwarded = value if forwarded is None else forwarded + b"," + value
        if authorization is not None and authorization[:7].lower() == b"bearer ":
            user = self._user(authorization)
            if user is not None:
                return user
        return "c:" + self._client(scope, forwarded)

    def _user(self, authorization: bytes) -> str | None:
        # Verifying a JWT costs ~100 µs, so a verified token is remembered for a minute. The only
        # effect of a token that expires meanwhile is which bucket counts it; the route still
        # refuses it. Invalid tokens are not remembered: they are anonymous callers.
        now = time.monotonic()
        known = self._users.get(authorization)
        if known is not None and now < known[1]:
            return known[0]
        try:
            principal = self._tokens.verify(authorization[7:].strip().decode("latin-1"))
        except InvalidToken:
            return None
        if len(self._users) >= 10_000:
            self._users.clear()
        user = f"u:{principal.user_id}"
        self._users[authorization] = (user, now + 60.0)
        return user

    def client_ip(self, scope: Scope) -> str:
        forwarded = None
        if self._trusted:
            for name, value in scope["headers"]:
                if name == b"x-forwarded-for":
                    forwarded = value if forwarded is None else forwarded + b"," + value
        return self._client(scope, forwarded)

    def _client(self, scope: Scope, forwarded: bytes | None) -> str:
        client = scope.get("client")
        peer = client[0] if client else "unknown"
        if forwarded is None or not self._trusted or not self._is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in forwarded.decode("latin-1").split(",") if hop.strip()]
        # Each proxy appends the address it saw: the rightmost untrusted hop is the real client.
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, address: str) -> bool:
        known = self._trusted_cache.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
                known = any(ip in network for network in self._trusted)
            except ValueError:
                known = False
            if len(self._trusted_cache) >= 4096:
                self._trusted_cache.clear()
            self._trusted_cache[address] = known
        return known

    # -- hits -----------------------------------------------------------------------------------

    async def hit(self, key: str, policy: Policy, *, fail_open: bool) -> Decision | None:
        """The limiter's decision; ``None`` when it is down and ``fail_open``, else raises."""
        if self._down_until and time.monotonic() < self._down_until:
            if fail_open:
                return None
            raise RateLimiterUnavailable("rate limiter cooling off after a failure")
        try:
            return await self.limiter.hit(key, policy)
        except RateLimiterUnavailable as exc:
            if time.monotonic() >= self._down_until:
                logger.warning(
                    "rate limiter unavailable; for {}s general limits fail {}, login fails {}: {}",
                    self._cooloff, "open" if self.fail_open else "closed",
                    "open" if self.login_fail_open else "closed", exc,
                )
            self._down_until = time.monotonic() + self._cooloff
            if fail_open:
                return None
            raise

    def rejected(self, policy: Policy) -> None:
        self._rejected[policy.name].inc()

    async def check_login(self, scope: Scope, username: str) -> None:
        """The login policies for this client and this account; raises ``RateLimited`` or
        ``RateLimiterDown``. The response's headers become the strictest decision."""
        if not self.enabled:
            return
        account = hashlib.blake2b(username.strip().lower().encode(), digest_size=16).hexdigest()
        checks = (
            (f"{AUTH_CLIENT}:c:{self.client_ip(scope)}", self.policies[AUTH_CLIENT]),
            (f"{AUTH_ACCOUNT}:a:{account}", self.policies[AUTH_ACCOUNT]),
        )
        slot: _Slot | None = scope.get(_SLOT)
        strictest = slot.decision if slot is not None else None
        for key, policy in checks:
            try:
                decision = await self.hit(key, policy, fail_open=self.login_fail_open)
            except RateLimiterUnavailable:
                raise RateLimiterDown(
                    "Login is unavailable while the rate limiter is down; retry shortly."
                ) from None
            if decision is None:
                continue
            strictest = _stricter(strictest, decision)
            if not decision.allowed:
                self.rejected(policy)
                headers = {"Retry-After": str(_retry_seconds(decision))}
                if slot is not None:
                    slot.decision = strictest
                else:  # no middleware in front: the error carries all the headers itself
                    headers.update((k.decode(), v.decode()) for k, v in _header_values(strictest))
                raise RateLimited(strictest, headers)
        if slot is not None and strictest is not None:
            slot.decision = strictest


class RateLimitMiddleware:
    """Applies the general policy of the route group to every HTTP request but the exempt ones."""

    def __init__(self, app: ASGIApp, *, limits: RateLimits) -> None:
        self.app = app
        self.limits = limits
        self._unavailable = orjson.dumps({"error": {
            "code": RateLimiterDown.code,
            "message": "The rate limiter is unavailable; retry shortly.",
            "details": {},
        }})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits = self.limits
        if scope["type"] != "http" or not limits.enabled:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root = scope.get("root_path")
        if root and path.startswith(root):
            path = path[len(root):]
        policy = limits.policy_for(path)
        if policy is None:
            await self.app(scope, receive, send)
            return
        try:
            decision = await limits.hit(f"{policy.name}:{limits.subject(scope)}", policy,
                                        fail_open=limits.fail_open)
        except RateLimiterUnavailable:
            await _respond(send, 503, self._unavailable, [(b"retry-after", b"1")])
            return
        if decision is None:  # limiter down, failing open: no headers to promise anything
            await self.app(scope, receive, send)
            return
        if not decision.allowed:
            limits.rejected(policy)
            await _refuse(send, decision)
            return
        slot = scope[_SLOT] = _Slot(decision)

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *_header_values(slot.decision)]
            await send(message)

        await self.app(scope, receive, send_with_limits)


async def _refuse(send: Send, decision: Decision) -> None:
    retry = _retry_seconds(decision)
    body = orjson.dumps({"error": {
        "code": RateLimited.code,
        "message": f"Too many requests; retry in {retry} s.",
        "details": {"limit": decision.limit, "retry_after": retry},
    }})
    await _respond(send, 429, body, [(b"retry-after", b"%d" % retry), *_header_values(decision)])


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [_JSON, (b"content-length", b"%d" % len(body)), *headers],
    })
    await send({"type": "http.response.body", "body": body})


async def _login_guard(
    request: Request,
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    limits: Annotated[RateLimits, Provided("rate_limits")],
) -> None:
    await limits.check_login(request.scope, form.username)


LoginRateLimit: Any = Depends(_login_guard)
"""``dependencies=[LoginRateLimit]`` on the token route: per-client and per-account login limits,
checked before the endpoint runs (FastAPI parses the form once for both)."""
