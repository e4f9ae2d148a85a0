"""The error envelope every API error answers with (DESIGN.md §5)."""

from __future__ import annotations

import httpx


def assert_envelope(response: httpx.Response, status: int, code: str) -> dict:
    """Assert ``response`` is an error envelope with ``status`` and ``code``; returns its ``error``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    return body["error"]
