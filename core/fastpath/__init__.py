"""The fast path: the one package that may use private names of the libraries under Atrium.

Each piece replaces a stock path (FastAPI's request handling and routing, SQLAlchemy's session
and pool, redis-py's client) with a leaner one that leans on those libraries' internals; the
README beside this file lists every private name, the versions it was verified on and what it
buys on the benchmark. The rest of the code base uses public API only and asks this package for a
piece only when the fast path is on, importing it then: with the fast path off, nothing of it but
this file is ever imported.

``ATRIUM_FAST_PATH`` (``Settings.fast_path``):

- ``auto`` (default): on when every library below is installed at a version it was verified on,
  else off, with one warning line naming what differs;
- ``on``: on whatever the versions (for trying a new release; a missing private name then fails
  at start-up, not on a request);
- ``off``: the stock FastAPI, SQLAlchemy and redis-py paths.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Literal

from fastapi import APIRouter
from loguru import logger

Mode = Literal["auto", "on", "off"]

# The distributions whose private names the fast path uses, and the releases each piece was run
# against with the whole suite in both modes (README.md beside this file). A release not listed
# turns ``auto`` off until it has been verified and added here.
VERIFIED: dict[str, tuple[str, ...]] = {
    "fastapi": ("0.165.0",),
    "starlette": ("1.10.0",),
    "sqlalchemy": ("2.1.9",),
    "asyncpg": ("0.32.0",),
    "redis": ("8.2.0",),
    "hiredis": ("3.5.0",),
}


def unverified() -> dict[str, str]:
    """The libraries installed at a release the fast path was not verified on: name -> version."""
    found: dict[str, str] = {}
    for name, releases in VERIFIED.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "missing"
        if installed not in releases:
            found[name] = installed
    return found


# The pieces, each measured alone on the benchmark (README.md beside this file).
PIECES = ("handler", "transactions", "pool", "redis")

_warned: set[tuple[tuple[str, str], ...]] = set()


def resolve(mode: Mode) -> bool:
    """Whether the fast path serves this process, for the configured ``mode``."""
    if mode == "off":
        return False
    if mode == "on":
        return True
    differs = unverified()
    if not differs:
        return True
    key = tuple(sorted(differs.items()))
    if key not in _warned:  # one line per process, however many apps it builds
        _warned.add(key)
        found = ", ".join(f"{name} {release}" for name, release in sorted(differs.items()))
        logger.warning("fast path off: not verified on {} (ATRIUM_FAST_PATH=auto, core/fastpath/README.md)",
                       found)
    return False


def pieces(mode: Mode, skip: tuple[str, ...] = ()) -> frozenset[str]:
    """The pieces that serve this process: all of them when the fast path is on, less ``skip``
    (``ATRIUM_FAST_PATH_SKIP``, for measuring a piece alone); none when it is off."""
    unknown = set(skip) - set(PIECES)
    if unknown:
        raise ValueError(f"unknown fast path pieces {sorted(unknown)}; the pieces are {', '.join(PIECES)}")
    return frozenset(PIECES) - set(skip) if resolve(mode) else frozenset()


def install(router: APIRouter, enabled: frozenset[str]) -> None:
    """The fast path's edge on an app's router: the lean handler on every route that offers an
    ``around`` wrapper (``core.edge.routes.TransactionalRoute``)."""
    if "handler" in enabled:
        from core.fastpath.handler import install_lean_handlers

        install_lean_handlers(router)
