"""Password hashing (argon2id), signed access tokens (JWT, HS256 only), refresh tokens, and the
port through which a session's authority is read on every request.

The services are plain objects without global state, so the container builds them once
from settings and tests build them with cheap parameters.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import argon2
import jwt
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = [
    "AccessClaims",
    "AuthorityStore",
    "InvalidToken",
    "PasswordHasher",
    "Principal",
    "RefreshTokens",
    "SessionAuthority",
    "TokenService",
]


class PasswordHasher:
    """argon2id hashing; blocking work also available off the event loop.

    Parameters left as ``None`` take the argon2-cffi defaults (RFC 9106 low-memory profile).
    """

    _DUMMY_PASSWORD: Final = "atrium-dummy-password-for-timing-equalisation"

    def __init__(
        self,
        time_cost: int | None = None,
        memory_cost: int | None = None,
        parallelism: int | None = None,
    ) -> None:
        defaults = argon2.PasswordHasher()
        self._hasher = argon2.PasswordHasher(
            time_cost=defaults.time_cost if time_cost is None else time_cost,
            memory_cost=defaults.memory_cost if memory_cost is None else memory_cost,
            parallelism=defaults.parallelism if parallelism is None else parallelism,
            hash_len=defaults.hash_len,
            salt_len=defaults.salt_len,
            type=argon2.Type.ID,
        )
        self._dummy_hash: str | None = None
        self._dummy_lock = threading.Lock()

    @property
    def time_cost(self) -> int:
        return self._hasher.time_cost

    @property
    def memory_cost(self) -> int:
        return self._hasher.memory_cost

    @property
    def parallelism(self) -> int:
        return self._hasher.parallelism

    def hash(self, password: str) -> str:
        """Return an encoded ``$argon2id$...`` hash with a fresh random salt."""
        return self._hasher.hash(password)

    def verify(self, hash: str, password: str) -> bool:
        """True when ``password`` matches ``hash``; False on mismatch or a hash that is not argon2."""
        try:
            return self._hasher.verify(hash, password)
        except (VerificationError, InvalidHashError, UnicodeEncodeError, TypeError):
            return False

    def needs_rehash(self, hash: str) -> bool:
        """True when ``hash`` was made with other parameters than this hasher's (or is unreadable)."""
        try:
            return self._hasher.check_needs_rehash(hash)
        except (InvalidHashError, ValueError, TypeError):
            return True

    async def hash_async(self, password: str) -> str:
        return await asyncio.to_thread(self.hash, password)

    async def verify_async(self, hash: str, password: str) -> bool:
        return await asyncio.to_thread(self.verify, hash, password)

    async def verify_dummy(self, password: str) -> None:
        """Spend the time of one real verification; use it when no user matches a login.

        Without it a login for an unknown e-mail answers much faster than one for a known
        e-mail with a wrong password, which tells an attacker which e-mails are registered.
        """
        await asyncio.to_thread(self._verify_dummy_sync, password)

    def _verify_dummy_sync(self, password: str) -> None:
        self.verify(self._get_dummy_hash(), password)

    def _get_dummy_hash(self) -> str:
        # Computed lazily (start-up stays fast) and once, with this hasher's own parameters so
        # a dummy verification costs exactly as much as a real one.
        if self._dummy_hash is None:
            with self._dummy_lock:
                if self._dummy_hash is None:
                    self._dummy_hash = self.hash(self._DUMMY_PASSWORD)
        return self._dummy_hash


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the user, whether they are an administrator and the session of their token.

    Built for a request from the account as it stands now (``AuthorityStore``), never from the
    token's claims alone. ``session_id`` is None only for callers that are not a bearer session
    (a job, a test acting for a user).
    """

    user_id: uuid.UUID
    is_admin: bool
    session_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What a verified access token says: whose it is and which session it belongs to.

    It grants nothing by itself: the session may have ended and the account changed since the
    token was issued. ``core.edge.auth`` asks the ``AuthorityStore`` what the session may do now.
    """

    user_id: uuid.UUID
    session_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class SessionAuthority:
    """A session as its account stands now: who it acts for, and whether it may act at all."""

    principal: Principal  # is_admin is the account's role now
    active: bool  # False: the account is disabled
    revoked: bool  # the session ended: logout, refresh token reuse, password change, disabling


class AuthorityStore(Protocol):
    """The port behind every authenticated request: what a session may do *now*.

    The module that owns accounts implements it (users: ``modules/users/authority.py``) and
    exports it as its container's provider ``authority``; core never imports a module. With no
    module providing it, every bearer token is refused. An implementation answers a revocation or
    a change of role within ``auth_cache_seconds`` (at most 1 s) in every process that serves the API.
    """

    async def authority(self, session_id: uuid.UUID) -> SessionAuthority | None:
        """The session's current authority, or None when no such session exists."""
        ...


class InvalidToken(Exception):
    """The access or refresh token is malformed, forged, expired or issued in the future."""


_ALGORITHM: Final = "HS256"
_REQUIRED_CLAIMS: Final = ("sub", "sid", "iss", "iat", "exp")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _uuid_claim(claims: dict[str, Any], name: str) -> uuid.UUID:
    value = claims.get(name)
    if not isinstance(value, str):
        raise InvalidToken(f"invalid {name} claim")
    try:
        return uuid.UUID(value)
    except ValueError as exc:
        raise InvalidToken(f"invalid {name} claim") from exc


class TokenService:
    """Issues and verifies short-lived HS256 access tokens: claims ``sub`` (user), ``sid``
    (session), ``iss``, ``iat`` and ``exp``. No role is in the token: authority comes from the
    account on every request (``AuthorityStore``), so a token stops working when its session ends.

    ``clock`` is the time source for both issuing and verifying (``exp``, ``iat``), so tests can
    move time without sleeping.

    Verification is a pure function of the token and the secret, so the claims of the last
    ``cache_size`` valid tokens are kept: a token seen again skips PyJWT (JSON, base64, HMAC: about
    a tenth of a ``POST /items``, bench/README.md) but still has its times checked against the
    clock, so it expires exactly when it would have. Refused tokens are never kept.
    """

    def __init__(
        self,
        secret: str,
        ttl_seconds: int,
        issuer: str = "atrium",
        clock: Callable[[], datetime] = _utc_now,
        leeway_seconds: int = 5,
        cache_size: int = 4096,
    ) -> None:
        if not secret:
            raise ValueError("the token secret must not be empty")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        self.issuer = issuer
        self._clock = clock
        self._leeway = leeway_seconds
        self._cache_size = cache_size
        self._verified: dict[str, tuple[AccessClaims, dict[str, Any]]] = {}  # oldest first

    def _now(self) -> int:
        return int(self._clock().timestamp())

    def issue(self, who: Principal | AccessClaims) -> str:
        """An access token for ``who``'s session.

        A ``Principal`` without a session gets a fresh session id that no ``AuthorityStore``
        knows: such a token names its user (the rate limiter tells users apart by it) but
        authenticates nobody.
        """
        session_id = who.session_id if who.session_id is not None else uuid.uuid4()
        now = self._now()
        claims: dict[str, Any] = {
            "sub": str(who.user_id),
            "sid": str(session_id),
            "iss": self.issuer,
            "iat": now,
            "exp": now + self.ttl_seconds,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> AccessClaims:
        """Return the token's claims or raise :class:`InvalidToken`."""
        if not isinstance(token, str) or not token:
            raise InvalidToken("no token")
        known = self._verified.get(token)
        if known is not None:
            claims, times = known
            self._check_times(times)
            return claims
        claims, times = self._decode(token)
        if self._cache_size > 0:
            if len(self._verified) >= self._cache_size:
                self._verified.pop(next(iter(self._verified)), None)
            self._verified[token] = (claims, times)
        return claims

    def _decode(self, token: str) -> tuple[AccessClaims, dict[str, Any]]:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                # A fixed list: the header's "alg" never chooses the algorithm, so "none",
                # HS512 or RS256 (key confusion) tokens are all refused.
                algorithms=[_ALGORITHM],
                issuer=self.issuer,
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    # Time claims are checked below against the injected clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc) or type(exc).__name__) from exc
        except (ValueError, TypeError) as exc:  # defensive: odd inputs inside PyJWT
            raise InvalidToken("malformed token") from exc

        self._check_times(claims)
        access = AccessClaims(user_id=_uuid_claim(claims, "sub"), session_id=_uuid_claim(claims, "sid"))
        return access, {name: claims[name] for name in ("iat", "exp")}

    def _check_times(self, claims: dict[str, Any]) -> None:
        values: dict[str, float] = {}
        for name in ("iat", "exp"):
            value = claims.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidToken(f"invalid {name} claim")
            values[name] = value
        now = self._now()
        if values["exp"] <= now - self._leeway:
            raise InvalidToken("token has expired")
        if values["iat"] > now + self._leeway:
            raise InvalidToken("token was issued in the future")

    def expires_at(self, issued_at: datetime | None = None) -> datetime:
        """When a token issued at ``issued_at`` (default: now) expires; handy for responses."""
        start = issued_at if issued_at is not None else self._clock()
        return start + timedelta(seconds=self.ttl_seconds)


_REFRESH_PREFIX: Final = "rt1."
_REFRESH_PAYLOAD: Final = 16 + 4  # session id, generation (unsigned 32-bit, big-endian)
_REFRESH_MAC: Final = 32  # HMAC-SHA256, untruncated


class RefreshTokens:
    """Opaque refresh tokens, each bound to one ``(session id, generation)`` of a session.

    A token is ``rt1.`` + base64url(session id | generation | HMAC-SHA256 of both), under a key
    derived from the secret for this use alone (a cursor or an access token signature is never a
    valid MAC here). Why a MAC and not a random secret stored hashed: nothing secret is stored, so a
    leaked database yields no usable token; and a token of an *older* generation is still
    recognisably ours, so presenting it proves reuse of a rotated token (the family is revoked)
    rather than garbage, which nobody can forge to revoke someone else's session.
    The server keeps the current generation (``user_sessions.generation``): rotating is a
    compare-and-set on it, so each token is accepted once.
    """

    def __init__(self, secret: str, ttl_seconds: int) -> None:
        if not secret:
            raise ValueError("the token secret must not be empty")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._key = hashlib.sha256(b"atrium-refresh-token:" + secret.encode()).digest()
        self.ttl_seconds = ttl_seconds

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(self, session_id: uuid.UUID, generation: int) -> str:
        if not 0 <= generation < 2**32:
            raise ValueError("generation out of range")
        payload = session_id.bytes + generation.to_bytes(4, "big")
        body = base64.urlsafe_b64encode(payload + self._mac(payload)).rstrip(b"=").decode("ascii")
        return _REFRESH_PREFIX + body

    def read(self, token: str) -> tuple[uuid.UUID, int]:
        """``(session id, generation)`` of a token this service issued, else :class:`InvalidToken`."""
        if not isinstance(token, str) or not token.startswith(_REFRESH_PREFIX):
            raise InvalidToken("not a refresh token")
        body = token[len(_REFRESH_PREFIX):]
        if len(body) != _REFRESH_TEXT_LENGTH:
            raise InvalidToken("malformed refresh token")
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
            raise InvalidToken("malformed refresh token") from exc
        if len(raw) != _REFRESH_PAYLOAD + _REFRESH_MAC:
            raise InvalidToken("malformed refresh token")
        payload, mac = raw[:_REFRESH_PAYLOAD], raw[_REFRESH_PAYLOAD:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidToken("refresh token signature mismatch")
        return uuid.UUID(bytes=payload[:16]), int.from_bytes(payload[16:], "big")


# base64url of 52 bytes without padding: every well-formed token body has exactly this length.
_REFRESH_TEXT_LENGTH: Final = -(-(_REFRESH_PAYLOAD + _REFRESH_MAC) * 4 // 3)
