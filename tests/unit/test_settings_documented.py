"""The README's settings table names every ``Settings`` field, and nothing else.

The table is the one after the ``<!-- settings-table`` comment in README.md; its first column holds
each field as its environment variable (``ATRIUM_<FIELD>``). A field added to ``config/settings.py``
without a row, or a row left behind by a removed or renamed field, fails here by name.
"""

from __future__ import annotations

import re
from pathlib import Path

from config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- settings-table"


def variable(field: str) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def table_rows() -> list[str]:
    """The settings table's body rows (header and separator left out)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    starts = [number for number, line in enumerate(lines) if line.startswith(MARKER)]
    assert len(starts) == 1, f"README.md should have exactly one {MARKER} ... --> line, found {len(starts)}"
    table: list[str] = []
    for line in lines[starts[0] + 1:]:
        if not line.startswith("|"):
            break
        table.append(line)
    assert len(table) > 2, "the settings table after the marker is empty"
    return table[2:]


def first_cell(row: str) -> str:
    return row.split("|")[1]


def named(row: str) -> set[str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return set(re.findall(rf"`({re.escape(prefix)}[A-Z0-9_]+)`", first_cell(row)))


def test_every_field_has_a_row() -> None:
    documented = set().union(*(named(row) for row in table_rows()))

    missing = [variable(field) for field in Settings.model_fields if variable(field) not in documented]

    assert missing == [], "README.md's settings table has no row for: " + ", ".join(missing)


def test_every_row_names_a_field() -> None:
    fields = {variable(field) for field in Settings.model_fields}
    strays = []
    for row in table_rows():
        names = named(row)
        if not names:
            strays.append(f"{first_cell(row).strip()!r} (no ATRIUM_ variable)")
        strays.extend(sorted(f"{name} (not a field)" for name in names - fields))

    assert strays == [], "README.md's settings table has rows for no setting: " + "; ".join(strays)


def test_each_field_has_one_row() -> None:
    seen: dict[str, int] = {}
    for row in table_rows():
        for name in named(row):
            seen[name] = seen.get(name, 0) + 1

    assert [name for name, count in seen.items() if count > 1] == []
