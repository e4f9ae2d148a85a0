"""Keyset pagination with opaque, tamper-evident cursors.

A cursor carries the last key the client saw plus a fingerprint of the query's filters, signed
with HMAC: a client can't forge a position, and a cursor from one query can't be replayed on
another. Any defect is an ``InvalidCursor`` (400), never a 500. As a query parameter a cursor is a
``Cursor``: one line of at most ``CURSOR_MAX`` characters (longer or control characters: 422).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Annotated, Any

import orjson
from pydantic import StringConstraints

from core.edge.errors import BadRequest
from core.edge.types import ONE_LINE

# Far above what ``CursorCodec`` makes (a position of a few ids, base64url-encoded).
CURSOR_MAX = 512
Cursor = Annotated[str, StringConstraints(max_length=CURSOR_MAX), ONE_LINE]


class InvalidCursor(BadRequest):
    code = "invalid_cursor"

    def __init__(self) -> None:
        super().__init__("The cursor is invalid or belongs to another query; start again without it.")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class CursorCodec:
    SIG_BYTES = 16

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"atrium-cursor:" + secret.encode()).digest()

    @staticmethod
    def fingerprint(filters: Mapping[str, Any]) -> str:
        canonical = orjson.dumps(
            {k: v for k, v in filters.items() if v is not None}, option=orjson.OPT_SORT_KEYS
        )
        return hashlib.blake2s(canonical, digest_size=8).hexdigest()

    def encode(self, position: Mapping[str, Any], filters: Mapping[str, Any]) -> str:
        body = orjson.dumps({"p": dict(position), "f": self.fingerprint(filters)})
        return _b64(body + self._sign(body))

    def decode(self, cursor: str, filters: Mapping[str, Any]) -> dict[str, Any]:
        """The position in ``cursor``; ``InvalidCursor`` for anything we did not make for these filters."""
        try:
            raw = _unb64(cursor)
        except (ValueError, TypeError):
            raise InvalidCursor() from None
        body, signature = raw[: -self.SIG_BYTES], raw[-self.SIG_BYTES :]
        if len(raw) <= self.SIG_BYTES or not hmac.compare_digest(signature, self._sign(body)):
            raise InvalidCursor()
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidCursor() from None
        if not isinstance(data, dict) or data.get("f") != self.fingerprint(filters):
            raise InvalidCursor()
        position = data.get("p")
        if not isinstance(position, dict):
            raise InvalidCursor()
        return position

    def _sign(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[: self.SIG_BYTES]
