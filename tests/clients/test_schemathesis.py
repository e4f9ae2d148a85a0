"""Schemathesis against a real ``atrium serve``, on both profiles: every check, every phase.

The schema is the one the process serves (``/openapi.json``) and every request goes over a socket to
it. Three accounts take part, described to schemathesis as a Web Fuzzing Commons auth document that
logs in through ``/api/v1/auth/token`` (and again after ``users.logout`` ends a session): two
ordinary users, who are each other's ``peers`` (``object_level_authorization`` replays one's reads of
its own invoices and payments as the other), and an administrator, whom schemathesis escalates to
where an ordinary user gets a 403 (the catalog's writes).

The verdict is schemathesis's own JSON report: how many test cases it generated, and the failures it
found. The test asserts at least ``MIN_CASES`` cases and no failure, no error.

Where a check's default expectation is wrong for behaviour the document states, ``CONFIG`` narrows
that check on those operations only, and says why.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.live_api import PROFILES, LiveApi, live_api

pytestmark = pytest.mark.slow

MIN_CASES = 1000
# Per operation, in the fuzzing phase (the coverage phase derives its ~1,100 cases from the document;
# the stateful phase's scenarios add a hundred or so): ~1,800 cases in ~20 s of schemathesis per
# profile, with the two profiles side by side on two cores (`pytest -n 2`).
MAX_EXAMPLES = 30
PHASES = "examples,coverage,fuzzing,stateful"
PHASE_NAMES = PHASES.split(",")
RUN_TIMEOUT = 300.0  # seconds: far above a normal run; a hung one fails with what it printed
PASSWORD = "schemathesis password 123"

LOGIN = "/api/v1/auth/token"

# schemathesis.toml. Every check schemathesis has runs on every operation in every phase (its
# default, stated here), except where a narrowing below says otherwise: each names the check, the
# operations and the statuses, and why the check's expectation is wrong there.
#
# positive_data_acceptance expects a request that matches the document to succeed, or to be refused
# for the caller or the state (401, 403, 404, 409, 429); these operations also refuse, by design,
# schema-valid input that JSON Schema cannot tell from good input.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # the check's defaults
CONFIG = f"""
[checks]
enabled = true  # every check: schemathesis's default, stated

# a cursor is a token the server signed (core.edge.pagination): any other string is 400 invalid_cursor
[[operations]]
include-operation-id = "billing.list_invoices"
checks.positive_data_acceptance.expected-statuses = {json.dumps([*ACCEPTED, "400"])}

# the same, and min_price above max_price (a rule across two parameters) is 422 validation_error
[[operations]]
include-operation-id = "items.list_items"
checks.positive_data_acceptance.expected-statuses = {json.dumps([*ACCEPTED, "400", "422"])}

# the lines must name items of the catalog, once each and in one currency: 422 unknown_items,
# duplicate_items, mixed_currencies, total_too_large
[[operations]]
include-operation-id = "billing.create_invoice"
checks.positive_data_acceptance.expected-statuses = {json.dumps([*ACCEPTED, "422"])}

# only the gateway can sign a delivery (an HMAC with its secret): 400 invalid_signature
[[operations]]
include-operation-id = "billing.gateway_webhook"
checks.positive_data_acceptance.expected-statuses = {json.dumps([*ACCEPTED, "400"])}

# a payment's Idempotency-Key names one request: the same key again with another body or for another
# invoice is 422 idempotency_key_reused (core.edge.idempotency), and generated keys do repeat
[[operations]]
include-operation-id = "billing.pay_invoice"
checks.positive_data_acceptance.expected-statuses = {json.dumps([*ACCEPTED, "422"])}

# ensure_resource_availability expects a resource a POST created to be found by the operation that
# reads it. A user is visible to itself and to administrators only, and 404 to anyone else (README);
# the account an ordinary user signs up in the stateful phase is someone else's.
[[operations]]
include-operation-id = "users.read_user"
checks.ensure_resource_availability.enabled = false
"""


def wfc_document(accounts: dict[str, str]) -> dict[str, Any]:
    """Each account logs in with the OAuth2 password form and sends ``Authorization: Bearer``."""
    return {
        "auth": [
            {
                "name": name,
                "loginEndpointAuth": {
                    "endpoint": LOGIN,
                    "verb": "POST",
                    "contentType": "application/x-www-form-urlencoded",
                    "payloadUserPwd": {
                        "username": email, "password": PASSWORD,
                        "usernameField": "username", "passwordField": "password",
                    },
                    "token": {
                        "extractFrom": "body", "extractSelector": "/access_token",
                        "sendIn": "header", "sendName": "Authorization", "sendTemplate": "Bearer {token}",
                    },
                },
            }
            for name, email in accounts.items()
        ]
    }


async def accounts(api: LiveApi) -> dict[str, str]:
    """Two ordinary users (signed up through the API) and an administrator (``atrium create-admin``),
    by name: the order is the order schemathesis tries them in."""
    made: dict[str, str] = {}
    for name in ("alice", "bob"):
        email = f"{name}-{uuid.uuid4().hex[:12]}@example.com"
        response = await api.client.post("/api/v1/users", json={
            "email": email, "password": PASSWORD, "full_name": name.title(), "age": 30})
        assert response.status_code == 201, response.text
        made[name] = email
    admin = f"admin-{uuid.uuid4().hex[:12]}@example.com"
    await api.cli("create-admin", "--email", admin, "--password", PASSWORD)
    made["admin"] = admin
    return made


def write_config(directory: Path, accounts: dict[str, str]) -> Path:
    wfc = directory / "wfc-auth.json"
    wfc.write_text(json.dumps(wfc_document(accounts), indent=2))
    config = directory / "schemathesis.toml"
    auth = (f"[auth.wfc]\npath = {json.dumps(str(wfc))}\n"
            f"peers = {json.dumps([name for name in accounts if name != 'admin'])}\n")
    config.write_text(auth + CONFIG)
    return config


async def run_schemathesis(base_url: str, config: Path, out: Path) -> tuple[dict[str, Any], str, float]:
    """``schemathesis run`` on the served document; its JSON report, its output, its wall time."""
    report = out / "report.json"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
        f"{base_url}/openapi.json",
        "--phases", PHASES,
        "--max-examples", str(MAX_EXAMPLES),
        "--continue-on-failure",
        "--workers", "1",
        "--generation-database", "none",
        "--report", "json", "--report-json-path", str(report),
        "--no-color",
    ]
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *command, cwd=out, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        pytest.fail(f"schemathesis ran for more than {RUN_TIMEOUT:.0f} s:\n{output.decode()[-20000:]}")
    elapsed = time.monotonic() - started
    text = output.decode(errors="replace")
    assert report.exists(), f"schemathesis wrote no report (exit {process.returncode}):\n{text[-20000:]}"
    return json.loads(report.read_text()), text, elapsed


@pytest.mark.parametrize("profile", PROFILES)
async def test_schemathesis_finds_nothing_wrong(
    profile: str, tmp_path: Path, pg_database_factory: Callable[[], Awaitable[str]]
) -> None:
    async with live_api(profile, tmp_path, pg_database_factory) as api:
        config = write_config(tmp_path, await accounts(api))
        result, output, elapsed = await run_schemathesis(api.base_url, config, tmp_path)

    cases = result["test_cases"]
    failures = sum(group["count"] for group in result["failures"])
    print(f"\nschemathesis on {profile}: {cases['generated']} cases, {failures} failures "
          f"({cases['with_failures']} cases with failures), {len(result['errors'])} errors, "
          f"in {elapsed:.1f} s (seed {result['seed']})")
    detail = f"seed {result['seed']}; schemathesis said:\n{output[-30000:]}"
    assert result["complete"], f"the run did not finish ({result['stop_reason']}); {detail}"
    assert not result["failures"], detail
    assert not result["errors"], detail
    assert result["exit_code"] == 0, detail
    assert cases["generated"] >= MIN_CASES, f"only {cases['generated']} cases; {detail}"
    # Every phase ran, every operation was tested, and the accounts stayed logged in.
    assert {name: phase["status"] for name, phase in result["phases"].items()} == dict.fromkeys(
        PHASE_NAMES, "success"), detail
    operations = result["operations"]
    assert operations["tested"] == operations["selected"] == operations["total"], detail
    assert not result["warnings"]["missing_auth"], detail
    assert not result["auth"]["reauth_broke"], detail
