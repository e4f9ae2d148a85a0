"""Idempotency keys: a retried POST takes effect once and gets the first answer again.

The key is claimed in its own short committed transaction, so a concurrent duplicate sees the
claim at once (and waits, instead of running the use case a second time). The response is stored
in the use case's own transaction, so it becomes visible exactly when the effect commits: a crash
in between leaves no effect and an in-flight row, which ``release`` clears for a retry.

An in-flight claim holds a short lease (``lease_seconds``), not the key's whole lifetime: if the
request dies without releasing (process killed, commit failed), the key can be claimed again once
the lease runs out. Each claim carries a random owner token, so a request whose lease expired and
was taken over can neither complete nor release the new owner's claim. A completed key lives for
``ttl_seconds`` and replays its response until then.
The same key with another request body is a client bug, refused rather than silently replayed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from loguru import logger
from sqlalchemy import JSON, CursorResult, String, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from core.db.base import Base, utcnow
from core.db.session import UnitOfWork, insert_or_ignore, rollback
from core.edge.errors import BadRequest, Conflict, Unprocessable

IN_FLIGHT, COMPLETED = "in_flight", "completed"


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    owner: Mapped[str] = mapped_column(String(32), default="")
    response_status: Mapped[int | None] = mapped_column(default=None)
    response_body: Mapped[Any] = mapped_column(JSON, nullable=True, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same": method, path and body (JSON compared by meaning)."""
    try:
        canonical = b"json:" + json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"),
                                          ensure_ascii=False).encode()
    except ValueError:  # not JSON (or not UTF-8): the bytes themselves
        canonical = b"raw:" + body
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), canonical):
        digest.update(len(part).to_bytes(8, "big") + part)  # length-prefixed: no ambiguous joins
    return digest.hexdigest()


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: Any


@dataclass(frozen=True)
class Claim:
    """Proof of owning a key: pass it to ``complete`` or ``release``."""

    scope: str
    key: str
    owner: str


KEY_MAX = 255
KEY_HEADER = "Idempotency-Key"
KEY_PATTERN = "^[!-~]+$"  # visible ASCII: what check_key accepts, as a JSON Schema pattern

# The header as the OpenAPI document states it, for a route that calls ``check_key`` (its
# ``openapi_extra``): required, whereas the route reads it as optional so that a missing key is the
# contract's 400 ``idempotency_key_required`` rather than a 422.
KEY_PARAMETER: dict[str, Any] = {
    "in": "header",
    "name": KEY_HEADER,
    "required": True,
    "description": f"1 to {KEY_MAX} visible ASCII characters, chosen by the client per intended effect: "
                   "a retry with the same key and body replays the first answer",
    "schema": {"type": "string", "minLength": 1, "maxLength": KEY_MAX, "pattern": KEY_PATTERN,
               "examples": ["order-1234-attempt-1"]},
}


def check_key(key: str | None) -> str:
    """The ``Idempotency-Key`` header of a route that requires one: 1-255 visible ASCII characters."""
    if key is None or key == "":
        raise BadRequest(f"This request requires an {KEY_HEADER} header.", code="idempotency_key_required")
    if len(key) > KEY_MAX or not all("!" <= ch <= "~" for ch in key):
        raise BadRequest(f"The Idempotency-Key must be 1 to {KEY_MAX} visible ASCII characters.",
                         code="invalid_idempotency_key")
    return key


class IdempotencyKeyReused(Unprocessable):
    code = "idempotency_key_reused"


class IdempotencyRequestInProgress(Conflict):
    code = "idempotency_request_in_progress"
    headers = {"Retry-After": "1"}


class IdempotencyClaimLost(Conflict):
    """``complete`` found no in-flight claim (released, or expired and taken over): roll back."""

    code = "idempotency_claim_lost"


class IdempotencyStore:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        ttl_seconds: float = 86400,
        lease_seconds: float = 60.0,
        wait_seconds: float = 5.0,
        poll_interval: float = 0.05,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._ttl = timedelta(seconds=ttl_seconds)
        self._lease = timedelta(seconds=lease_seconds)
        self._wait = wait_seconds
        self._poll = poll_interval
        self._clock = clock

    async def claim(self, scope: str, key: str, fingerprint: str) -> Claim | StoredResponse:
        """A ``Claim``: the caller owns the key. A response: replay it. Raises on reuse or a long wait."""
        deadline = time.monotonic() + self._wait
        while True:
            owner = secrets.token_hex(16)
            async with UnitOfWork(self._sessions) as session:
                if await self._claim_once(session, scope, key, fingerprint, owner):
                    return Claim(scope, key, owner)
                row = (await session.execute(
                    select(IdempotencyKey.fingerprint, IdempotencyKey.state,
                           IdempotencyKey.response_status, IdempotencyKey.response_body)
                    .where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
                )).one_or_none()
            if row is None:  # released (or purged) in between: claim again
                continue
            if row.fingerprint != fingerprint:
                raise IdempotencyKeyReused("This Idempotency-Key was already used with a different request.")
            if row.state == COMPLETED:
                return StoredResponse(status=int(row.response_status), body=row.response_body)
            if time.monotonic() >= deadline:
                raise IdempotencyRequestInProgress(
                    "A request with this Idempotency-Key is still in progress; retry shortly."
                )
            await asyncio.sleep(self._poll)

    async def _claim_once(
        self, session: AsyncSession, scope: str, key: str, fingerprint: str, owner: str
    ) -> bool:
        """Insert the claim, or take over an expired row; True when this caller now owns the key."""
        now = self._clock()
        values = {"fingerprint": fingerprint, "state": IN_FLIGHT, "owner": owner, "response_status": None,
                  "response_body": None, "created_at": now, "expires_at": now + self._lease}
        inserted = cast("CursorResult[Any]", await session.execute(
            insert_or_ignore(session, IdempotencyKey).values(scope=scope, key=key, **values)
        ))
        if inserted.rowcount:
            return True
        # An expired row (a completed key past its TTL, or an in-flight claim past its lease) counts
        # as absent. The condition is re-checked under the row lock, so of two callers taking over
        # the same expired row only one succeeds.
        taken = cast("CursorResult[Any]", await session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.scope == scope, IdempotencyKey.key == key, IdempotencyKey.expires_at < now)
            .values(**values)
        ))
        return bool(taken.rowcount)

    async def complete(self, session: AsyncSession, claim: Claim, response: StoredResponse) -> None:
        """Store the response in the caller's transaction; visible when (and only if) it commits.

        Raises ``IdempotencyClaimLost`` when the claim is no longer this caller's (its lease ran out
        and another request took the key): the caller must roll back its effect.
        """
        result = cast("CursorResult[Any]", await session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.scope == claim.scope, IdempotencyKey.key == claim.key,
                   IdempotencyKey.state == IN_FLIGHT, IdempotencyKey.owner == claim.owner)
            .values(state=COMPLETED, response_status=response.status, response_body=response.body,
                    expires_at=self._clock() + self._ttl)
        ))
        if not result.rowcount:
            raise IdempotencyClaimLost("The Idempotency-Key is no longer held by this request; retry it.")

    async def release(self, claim: Claim) -> None:
        """Forget this caller's in-flight claim after a failed use case, so the client may retry."""
        async with UnitOfWork(self._sessions) as session:
            await session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.scope == claim.scope, IdempotencyKey.key == claim.key,
                    IdempotencyKey.state == IN_FLIGHT, IdempotencyKey.owner == claim.owner,
                )
            )

    async def purge_forever(self, interval: float) -> None:
        """Delete expired keys every ``interval`` seconds (run by the worker) until cancelled."""
        while True:
            try:
                purged = await self.purge_expired()
                if purged:
                    logger.info("idempotency: purged {} expired keys", purged)
            except Exception as exc:  # the database may be briefly away; try again next round
                logger.warning("idempotency: purge failed: {}", exc)
            await asyncio.sleep(interval)

    async def purge_expired(self) -> int:
        async with UnitOfWork(self._sessions) as session:
            result = cast("CursorResult[Any]", await session.execute(
                delete(IdempotencyKey).where(IdempotencyKey.expires_at < self._clock())
            ))
            return int(result.rowcount or 0)


async def run_once(
    store: IdempotencyStore,
    session: AsyncSession,
    scope: str,
    key: str,
    fingerprint: str,
    action: Callable[[], Awaitable[StoredResponse]],
) -> tuple[StoredResponse, bool]:
    """Run ``action`` at most once per key; returns its response and whether it was a replay.

    The response is stored in ``session`` (the use case's transaction). If the action fails, the
    session is rolled back and the claim released so the client may retry; if even that fails,
    the lease frees the key. Call it before ``session`` has begun a transaction: on SQLite a
    transaction holds the database's write lock, which the claim's own transaction needs.
    """
    claimed = await store.claim(scope, key, fingerprint)
    if isinstance(claimed, StoredResponse):
        return claimed, True
    try:
        response = await action()
        await store.complete(session, claimed, response)
    except BaseException:
        try:
            # The effect is void anyway; rolling back first also frees SQLite's write lock,
            # which the release's own transaction would otherwise wait for.
            await asyncio.shield(rollback(session))
            await asyncio.shield(store.release(claimed))
        except Exception as exc:  # the lease will free the key
            logger.warning("idempotency: could not release key in scope {}: {}", scope, type(exc).__name__)
        raise
    return response, False
