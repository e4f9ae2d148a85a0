"""``ATRIUM_FAST_PATH``: which pieces serve a process, and a ``Provided`` id checked at start-up."""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated

import pytest
from dependency_injector import containers, providers
from fastapi import APIRouter, Depends

import main
from core import fastpath
from core.edge.provided import Provided
from core.edge.routes import TransactionalRoute, check_provided
from core.module import ModuleError
from tests.support.settings import make_settings


class TestPieces:
    def test_off_serves_no_piece(self) -> None:
        assert fastpath.pieces("off") == frozenset()

    def test_on_serves_every_piece_but_the_skipped(self) -> None:
        assert fastpath.pieces("on", ("pool",)) == frozenset(fastpath.PIECES) - {"pool"}

    def test_auto_is_on_exactly_when_every_version_is_a_verified_one(self) -> None:
        expected = frozenset(fastpath.PIECES) if not fastpath.unverified() else frozenset()
        assert fastpath.pieces("auto") == expected

    def test_auto_turns_off_when_a_library_is_not_a_verified_release(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(fastpath.VERIFIED, "fastapi", ("0.0.1",))
        assert "fastapi" in fastpath.unverified()
        assert fastpath.pieces("auto") == frozenset()

    def test_an_unknown_piece_is_refused(self) -> None:
        with pytest.raises(ValueError, match="unknown fast path pieces"):
            fastpath.pieces("on", ("turbo",))


def _imported_fastpath_modules(mode: str) -> list[str]:
    """The ``core.fastpath`` submodules a fresh process imports to build the app in ``mode``."""
    code = (
        "import sys, main\n"
        "from tests.support.settings import make_settings\n"
        f"main.create_app(make_settings(fast_path={mode!r}))\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('core.fastpath.'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=60)
    return [name for name in done.stdout.strip().split(",") if name]


def test_with_the_fast_path_off_none_of_its_pieces_is_imported() -> None:
    assert _imported_fastpath_modules("off") == []


def _lean_routes(app: object) -> int:
    """How many of the app's routes answer through the fast path's lean handler."""
    routes = app.router.routes  # type: ignore[attr-defined]
    return sum("lean_app" in getattr(getattr(r, "app", None), "__qualname__", "") for r in routes)


def test_with_the_fast_path_on_its_transactional_routes_get_the_lean_handler() -> None:
    app = main.create_app(make_settings(fast_path="on"))
    assert app.state.container.fast_path() == frozenset(fastpath.PIECES)
    assert _lean_routes(app) > 10  # every module route qualifies
    assert _lean_routes(main.create_app(make_settings(fast_path="off"))) == 0
    skipped = main.create_app(make_settings(fast_path="on", fast_path_skip=("handler",)))
    assert _lean_routes(skipped) == 0


class _Words(containers.DeclarativeContainer):
    greeting = providers.Object("hello")


def test_a_provided_id_that_names_no_provider_fails_when_the_app_is_built() -> None:
    router = APIRouter(route_class=TransactionalRoute)

    @router.get("/typo")
    async def typo(word: Annotated[str, Provided("greting")]) -> str:
        return word

    with pytest.raises(ModuleError, match=r"GET /typo: Provided\('greting'\)"):
        check_provided(router, _Words())


async def _needs_a_missing_word(word: Annotated[str, Provided("missing.word")]) -> str:
    return word


def test_a_provided_id_in_a_sub_dependency_is_checked_too() -> None:
    router = APIRouter()

    @router.get("/nested")
    async def nested(word: Annotated[str, Depends(_needs_a_missing_word)]) -> str:
        return word

    with pytest.raises(ModuleError, match=r"missing\.word"):
        check_provided(router, _Words())


def test_the_apps_own_provided_ids_all_resolve() -> None:
    app = main.create_app(make_settings())
    check_provided(app.router, app.state.container)  # create_app ran it too; this names the scope
