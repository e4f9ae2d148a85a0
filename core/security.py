"""Password hashing (argon2id) and signed access tokens (JWT, HS256 only).

Both services are plain objects without global state, so the container builds them once
from settings and tests build them with cheap parameters.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import argon2
import jwt
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["InvalidToken", "PasswordHasher", "Principal", "TokenService"]


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
    """Who is calling: the authenticated user and whether they are an administrator."""

    user_id: uuid.UUID
    is_admin: bool


class InvalidToken(Exception):
    """The token is malformed, forged, expired, not yet valid or not an access token."""


_ALGORITHM: Final = "HS256"
_TOKEN_TYPE: Final = "access"
_REQUIRED_CLAIMS: Final = ("sub", "adm", "iss", "iat", "nbf", "exp", "jti", "typ")


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TokenService:
    """Issues and verifies short-lived HS256 access tokens.

    ``clock`` is the time source for both issuing and verifying (``exp``, ``nbf``, ``iat``),
    so tests can move time without sleeping.

    Verification is a pure function of the token and the secret, so the principals of the last
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
        self._verified: dict[str, tuple[Principal, dict[str, Any]]] = {}  # oldest first

    def _now(self) -> int:
        return int(self._clock().timestamp())

    def issue(self, principal: Principal) -> str:
        now = self._now()
        claims: dict[str, Any] = {
            "sub": str(principal.user_id),
            "adm": bool(principal.is_admin),
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl_seconds,
            "jti": uuid.uuid4().hex,
            "typ": _TOKEN_TYPE,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> Principal:
        """Return the token's principal or raise :class:`InvalidToken`."""
        if not isinstance(token, str) or not token:
            raise InvalidToken("no token")
        known = self._verified.get(token)
        if known is not None:
            principal, times = known
            self._check_times(times)
            return principal
        principal, times = self._decode(token)
        if self._cache_size > 0:
            if len(self._verified) >= self._cache_size:
                self._verified.pop(next(iter(self._verified)), None)
            self._verified[token] = (principal, times)
        return principal

    def _decode(self, token: str) -> tuple[Principal, dict[str, Any]]:
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
        if claims.get("typ") != _TOKEN_TYPE:
            raise InvalidToken("not an access token")
        adm = claims.get("adm")
        if not isinstance(adm, bool):
            raise InvalidToken("invalid adm claim")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise InvalidToken("invalid jti claim")
        sub = claims.get("sub")
        if not isinstance(sub, str):
            raise InvalidToken("invalid sub claim")
        try:
            user_id = uuid.UUID(sub)
        except ValueError as exc:
            raise InvalidToken("invalid sub claim") from exc
        times = {name: claims[name] for name in ("iat", "nbf", "exp")}
        return Principal(user_id=user_id, is_admin=adm), times

    def _check_times(self, claims: dict[str, Any]) -> None:
        values: dict[str, float] = {}
        for name in ("iat", "nbf", "exp"):
            value = claims.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidToken(f"invalid {name} claim")
            values[name] = value
        now = self._now()
        if values["exp"] <= now - self._leeway:
            raise InvalidToken("token has expired")
        if values["nbf"] > now + self._leeway:
            raise InvalidToken("token is not valid yet")
        if values["iat"] > now + self._leeway:
            raise InvalidToken("token was issued in the future")

    def expires_at(self, issued_at: datetime | None = None) -> datetime:
        """When a token issued at ``issued_at`` (default: now) expires; handy for responses."""
        start = issued_at if issued_at is not None else self._clock()
        return start + timedelta(seconds=self.ttl_seconds)
