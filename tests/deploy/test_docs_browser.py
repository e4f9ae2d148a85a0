"""``/docs`` and ``/redoc`` rendered by a real browser, with every host but the app's unreachable.

``atrium serve`` runs on the development profile (SQLite) on a free port; Debian's ``chromium``
opens each page headless, lets its scripts run (``--virtual-time-budget``) and prints the DOM they
built. Every operation of the OpenAPI document in that DOM proves that Swagger UI and ReDoc were
loaded from the app and ran: the browser cannot resolve any other host name.

Without a chromium binary the tests skip, except under ``CI=true``, where they fail
(scripts/services installs the package).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api_process import serve_process
from tests.support.services import require_program
from tests.support.settings import GENEROUS_RATE_LIMITS

pytestmark = [pytest.mark.slow]

BROWSERS = ("chromium", "chromium-browser")  # Debian's package installs /usr/bin/chromium
BUDGET_MS = 15_000  # virtual time for the page's scripts: fetch the document, render it
TIMEOUT = 120.0  # wall-clock limit of one browser run


def require_chromium() -> str:
    """The chromium binary; skips the test locally and fails it under CI=true when it is missing."""
    return require_program(*BROWSERS, package="chromium")


@pytest.fixture(scope="module")
async def served(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """``atrium serve`` on the development profile: a client and the base URL a browser opens."""
    require_chromium()
    tmp: Path = tmp_path_factory.mktemp("docs-browser")
    values: dict[str, Any] = {
        "env": "development",
        "database_url": f"sqlite+aiosqlite:///{tmp / 'dev.db'}",
        "log_level": "WARNING",
        **GENEROUS_RATE_LIMITS,
    }
    async with serve_process(values, tmp / "api.log") as client:
        yield client, str(client.base_url).rstrip("/")


async def rendered(url: str, profile: Path) -> str:
    """The DOM of ``url`` after its scripts ran, as chromium prints it."""
    process = await asyncio.create_subprocess_exec(
        require_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        f"--user-data-dir={profile}",
        # No other host can be reached: what renders was loaded from the app.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--virtual-time-budget={BUDGET_MS}", "--dump-dom", url,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"chromium did not finish {url} within {TIMEOUT:g}s") from None
    assert process.returncode == 0, f"chromium exited {process.returncode} on {url}:\n{err.decode()[-3000:]}"
    return out.decode()


async def operations(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    """(path, operation id) of every operation of the app's OpenAPI document."""
    document = (await client.get("/openapi.json")).json()
    found = [(path, operation["operationId"]) for path, item in document["paths"].items()
             for operation in item.values() if isinstance(operation, dict) and "operationId" in operation]
    assert any(path.startswith("/api/v1/items") for path, _ in found)
    return found


async def test_swagger_ui_renders_every_operation(
    served: tuple[httpx.AsyncClient, str], tmp_path: Path
) -> None:
    client, base = served
    dom = await rendered(f"{base}/docs", tmp_path / "profile")
    assert 'id="swagger-ui"' in dom
    missing = []
    for path, operation_id in await operations(client):
        # Swagger UI marks each operation with its path and an element id made of tag and operation
        # id (a "." escaped as "\.").
        if f'data-path="{path}"' not in dom:
            missing.append(path)
        if f"-{operation_id}\"" not in dom and "-" + operation_id.replace(".", "\\.") + '"' not in dom:
            missing.append(operation_id)
    assert missing == [], f"not rendered by Swagger UI: {missing}\n{dom[-2000:]}"


async def test_redoc_renders_every_operation(served: tuple[httpx.AsyncClient, str], tmp_path: Path) -> None:
    client, base = served
    dom = await rendered(f"{base}/redoc", tmp_path / "profile")
    missing = [operation_id for _, operation_id in await operations(client)
               if f'operation/{operation_id}"' not in dom]
    missing += [path for path, _ in await operations(client) if path not in dom]
    assert missing == [], f"not rendered by ReDoc: {missing}\n{dom[-2000:]}"
