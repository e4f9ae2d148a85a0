"""``tooling.module_docs``: docs/modules.md is generated, deterministic and kept up to date."""

from __future__ import annotations

import difflib
import importlib
import random
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import main
from core.module import load_modules
from tooling.module_docs import render
from tooling.verify import discover

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "modules.md"


def current() -> str:
    return render(load_modules(discover()), api_prefix=main.API_PREFIX)


# --- the committed file -----------------------------------------------------------------------------


def test_docs_modules_md_is_up_to_date() -> None:
    """CI's staleness check: regenerate with `atrium modules docs` and commit the result."""
    expected = current()
    committed = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else ""

    diff = "".join(difflib.unified_diff(committed.splitlines(True), expected.splitlines(True),
                                        "docs/modules.md (committed)", "atrium modules docs"))
    assert committed == expected, f"docs/modules.md is stale: run `atrium modules docs`\n{diff}"


def test_the_output_does_not_depend_on_the_module_order() -> None:
    modules = load_modules(discover())
    shuffled = list(modules)
    random.Random(7).shuffle(shuffled)

    assert render(shuffled) == render(modules)


def test_the_real_document_has_every_section() -> None:
    text = current()

    assert "```mermaid\nflowchart LR\n" in text
    assert "    billing --> users\n" in text
    assert "    billing --> items\n" in text
    assert '    users -.->|"users.UserRegistered"| users\n' in text
    for name in ("users", "items", "billing"):
        assert f"\n## {name}\n" in text
    assert "| POST | `/api/v1/invoices` |" in text
    assert "- `async prices(session: AsyncSession, item_ids: Collection[uuid.UUID]) -> " in text
    assert "- `billing.charge_payment` — Charge the gateway once" in text
    assert "- `invoice_lines`" in text
    assert "20" not in text.split("\n", 3)[0]  # no date in the header


def test_check_passes_on_a_fresh_file_and_fails_on_a_stale_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "modules.md"

    assert main._module_docs(str(target), check=True) == 1  # missing counts as stale
    assert main._module_docs(str(target), check=False) == 0
    assert main._module_docs(str(target), check=True) == 0
    target.write_text(target.read_text() + "hand edit\n")
    capsys.readouterr()

    assert main._module_docs(str(target), check=True) == 1
    message = capsys.readouterr().err.strip()
    assert message == f"atrium: {target} is stale: run `atrium modules docs` and commit it"


# --- a throwaway pair of modules --------------------------------------------------------------------

A_PUBLIC = '''\
"""a's public face."""

from dataclasses import dataclass
from typing import Protocol

from core.messaging.events import IntegrationEvent


@dataclass(frozen=True)
class Thing:
    id: int


class ThingsFacade(Protocol):
    """Look things up."""

    async def thing(self, thing_id: int, *, fresh: bool = False) -> Thing | None:
        """The thing with this id, or None.

        More text that stays out of the document.
        """
        ...

    def count(self) -> int: ...


class ThingMade(IntegrationEvent):
    """A thing was made."""

    name = "a.ThingMade"

    thing_id: int


class ThingLost(IntegrationEvent):
    name = "a.ThingLost"
'''

A_MODULE = '''\
from dependency_injector import containers
from fastapi import APIRouter

from core.module import Module

router = APIRouter()


@router.get("/things/{thing_id}")
async def get_thing(thing_id: int) -> dict:
    """One thing | by id."""
    return {}


@router.post("/things")
async def make_thing() -> dict:
    return {}


class Container(containers.DeclarativeContainer):
    pass


MODULE = Module(name="a", container=Container, router=router)
'''

B_MODULE = '''\
from dependency_injector import containers
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.module import Module
from core.messaging.queue import JobContext, task
from PKG.a.public import ThingMade


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "b_rows"

    id: Mapped[int] = mapped_column(primary_key=True)


@task("b.on_thing_made")
async def on_thing_made(ctx: JobContext, event: ThingMade) -> None:
    """Count the new thing."""


@task("b.tidy")
async def tidy(ctx: JobContext, payload: dict) -> None: ...


class Container(containers.DeclarativeContainer):
    pass


MODULE = Module(name="b", container=Container, depends_on=("a",), tasks=(tidy,), models=(Row,),
                subscriptions={ThingMade: (on_thing_made,)})
'''


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Modules ``a`` (routes, facade, events) and ``b`` (depends on a, handles ThingMade, a table)."""
    package = f"mud_{uuid.uuid4().hex[:8]}"
    monkeypatch.syspath_prepend(str(tmp_path))
    for relative, text in {
        "__init__.py": "", "a/__init__.py": "", "a/public.py": A_PUBLIC, "a/module.py": A_MODULE,
        "b/__init__.py": "", "b/module.py": B_MODULE.replace("PKG", package),
    }.items():
        path = tmp_path / package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    importlib.invalidate_caches()
    yield package
    for key in [k for k in sys.modules if k == package or k.startswith(f"{package}.")]:
        del sys.modules[key]


def test_the_diagram_has_dependencies_and_events(pair: str) -> None:
    text = render(load_modules(["b", "a"], package=pair), package=pair)

    diagram = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert diagram.splitlines() == [
        "flowchart LR",
        "    a",
        "    b",
        "    b --> a",
        '    a -.->|"a.ThingMade"| b',
    ]


def test_a_section_lists_routes_facade_events_actors_and_tables(pair: str) -> None:
    text = render(load_modules(["a", "b"], package=pair), package=pair, api_prefix="/api/v9")
    a = text.split("\n## a\n", 1)[1].split("\n## b\n", 1)[0]
    b = text.split("\n## b\n", 1)[1]

    assert "| GET | `/api/v9/things/{thing_id}` | One thing \\| by id. |" in a
    assert "| POST | `/api/v9/things` |  |" in a
    assert "`ThingsFacade`: Look things up." in a
    assert "- `count() -> int`\n" in a
    assert ("- `async thing(thing_id: int, *, fresh: bool = False) -> Thing | None`"
            " — The thing with this id, or None.\n") in a
    assert "Data: `Thing`." in a
    assert "- `a.ThingLost`, handled by no module\n" in a
    assert "- `a.ThingMade`, handled by b — A thing was made.\n" in a
    assert "### Actors\n\nNone." in a

    assert "Depends on: a." in b
    assert "### Routes\n\nNone." in b
    assert "- `a.ThingMade` from a -> `b.on_thing_made`" in b
    assert "- `b.on_thing_made` — Count the new thing.\n- `b.tidy`\n" in b
    assert "- `b_rows`" in b
    assert "### Public facade\n\nNone." in b  # b has no public.py
