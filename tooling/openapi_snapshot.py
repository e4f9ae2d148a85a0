"""The committed OpenAPI document: ``openapi.json`` at the repository's root.

``python -m tooling.openapi_snapshot`` rewrites it from the app; ``--check`` writes nothing and exits
1 when it is stale, listing the changes (breaking ones first, ``tooling.openapi_diff``). The file is
pretty-printed with sorted keys, so a change to the API is a readable diff in review;
tests/api/test_openapi_contract.py fails while it differs from what the app serves.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from config import Settings, load_settings
from tooling.openapi_diff import compare

SNAPSHOT = Path(__file__).resolve().parent.parent / "openapi.json"

# The settings that shape the document, pinned: the snapshot describes the default deployment (every
# module served, the default rate-limit groups and fail modes), whatever the environment says.
PINNED: dict[str, Any] = {
    "env": "test",
    "modules": ("users", "items", "billing"),
    "api_modules": (),
    "root_path": "",
    "rate_limit_backend": "memory",
    "rate_limit_groups": {},
    "rate_limit_fail_open": True,
    "rate_limit_login_fail_open": False,
}


def document(settings: Settings | None = None) -> dict[str, Any]:
    """The document the app serves at ``/openapi.json`` (built from ``PINNED`` when no ``settings``)."""
    from main import create_app

    app = create_app(settings or load_settings(**PINNED))
    return app.openapi()


def render(doc: Mapping[str, Any]) -> str:
    """The file's text: stable for a given document (sorted keys, two-space indent, ASCII, one newline)."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def stale(committed: str | None, live: Mapping[str, Any]) -> str | None:
    """Why ``committed`` (the file's text; None when missing) is not ``live``; None when it is current."""
    if committed == render(live):
        return None
    if committed is None:
        return "openapi.json is missing"
    return compare(json.loads(committed), live).report()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tooling.openapi_snapshot", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when the file is stale, write nothing")
    parser.add_argument("--output", type=Path, default=SNAPSHOT, help=f"default: {SNAPSHOT}")
    args = parser.parse_args(argv)
    live = document()
    committed = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
    problem = stale(committed, live)
    if args.check:
        if problem is not None:
            print(f"{args.output} is stale: run `python -m tooling.openapi_snapshot` and commit it",
                  problem, sep="\n", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    if problem is not None and committed is not None:
        print(problem)
    args.output.write_text(render(live), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
