"""Alembic migrations, run by ``atrium migrate`` (or by the app itself on development).

Each module owns its history in ``modules/<name>/migrations`` (a branch labelled with the module's
name); core's tables (outbox, inbox, idempotency keys) live in ``migrations/versions`` (branch
``core``). A module can be added or removed without touching anyone else's migrations.
``upgrade`` brings core and every enabled module to its head and says which revisions it applied,
one line each (alembic's own INFO lines are left to DEBUG: core.observability.logging). Every
module folder on disk is a version location, so a database that still carries a disabled module's
revision stays readable.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.migration import MigrationInfo

    from config import Settings

HERE = Path(__file__).resolve().parent
CORE_VERSIONS = HERE / "versions"
MODULES_ROOT = HERE.parent / "modules"
CORE_BRANCH = "core"

# The single linear history used before histories were split per module (revisions 0001-0005),
# and the per-branch revisions each one corresponds to. A database stamped with one of these
# is re-stamped once, without touching its tables.
LEGACY = {
    "0001": ("core_0001", "users_0001"),
    "0002": ("core_0001", "users_0001", "items_0001"),
    "0003": ("core_0002", "users_0001", "items_0001"),
    "0004": ("core_0003", "users_0001", "items_0001"),
    "0005": ("core_0003", "users_0001", "items_0001", "billing_0001"),
}


def module_history(name: str) -> Path | None:
    path = MODULES_ROOT / name / "migrations"
    return path if path.is_dir() else None


def version_locations() -> list[Path]:
    return [CORE_VERSIONS, *sorted(p for p in MODULES_ROOT.glob("*/migrations") if p.is_dir())]


def alembic_config(settings: Settings) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", os.pathsep.join(str(p) for p in version_locations()))
    config.set_main_option("sqlalchemy.url", settings.database_url.replace("%", "%%"))
    config.attributes["settings"] = settings
    return config


def targets(settings: Settings) -> list[str]:
    """The heads ``upgrade`` aims for: core's and those of the enabled modules that have a history."""
    return [f"{CORE_BRANCH}@head", *(f"{name}@head" for name in settings.modules if module_history(name))]


def upgrade(settings: Settings, revision: str | None = None,
            report: Callable[[str], None] | None = None) -> list[str]:
    """Bring the database to ``revision`` (default: every enabled branch's head); blocking.

    Returns one line per revision applied (none: the schema was up to date), each also handed to
    ``report`` (default: the log at INFO) once the history it belongs to is committed.
    """
    from alembic import command

    applied: list[str] = []
    pending: list[str] = []
    say = report or (lambda line: logger.info("migrate: {}", line))

    def on_version_apply(*, step: MigrationInfo, **_: Any) -> None:  # alembic's hook, per step
        if step.is_upgrade and step.is_migration:
            doc = getattr(step.up_revision, "doc", None)  # a Script's message; a bare Revision has none
            pending.append(f"applied {step.up_revision_id}" + (f" ({doc})" if doc else ""))

    config = alembic_config(settings)
    config.attributes["on_version_apply"] = on_version_apply  # read by env.py
    adopt_legacy_history(config, settings)
    for target in [revision] if revision else targets(settings):
        command.upgrade(config, target)  # one transaction per history where the database allows
        for line in pending:
            say(line)
        applied += pending
        pending.clear()
    return applied


def downgrade(settings: Settings, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(settings), revision)


def adopt_legacy_history(config: Config, settings: Settings) -> bool:
    """Re-stamp a database migrated by the old single history; True when it did."""
    from alembic import command

    current = asyncio.run(_stamped(settings.database_url))
    if len(current) != 1 or next(iter(current)) not in LEGACY:
        return False
    command.stamp(config, list(LEGACY[next(iter(current))]), purge=True)
    return True


async def _stamped(url: str) -> set[str]:
    from sqlalchemy import inspect, text

    from core.db.engine import create_engine

    engine = create_engine(url, pool_pre_ping=False)
    try:
        async with engine.connect() as connection:
            exists = await connection.run_sync(lambda c: inspect(c).has_table("alembic_version"))
            if not exists:
                return set()
            rows = await connection.execute(text("SELECT version_num FROM alembic_version"))
            return {row[0] for row in rows}
    finally:
        await engine.dispose()


def new_revision(settings: Settings, branch: str, message: str, autogenerate: bool = False) -> Path:
    """Add a revision to ``branch`` ("core" or a module's name); starts the module's history if new.

    With ``autogenerate`` the enabled modules' models are compared with the database's schema.
    """
    from alembic import command
    from alembic.script import ScriptDirectory

    config = alembic_config(settings)
    folder = CORE_VERSIONS if branch == CORE_BRANCH else MODULES_ROOT / branch / "migrations"
    if branch != CORE_BRANCH and not (MODULES_ROOT / branch).is_dir():
        raise ValueError(f"no module folder modules/{branch}")
    revisions = list(ScriptDirectory.from_config(config).walk_revisions())
    if branch in {label for r in revisions for label in r.branch_labels}:
        count = sum(1 for r in revisions if Path(r.path).parent == folder)
        script = command.revision(config, message, autogenerate=autogenerate, head=f"{branch}@head",
                                  rev_id=f"{branch}_{count + 1:04d}")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        config.set_main_option("version_locations", os.pathsep.join(
            str(p) for p in dict.fromkeys([*version_locations(), folder])))
        script = command.revision(config, message, autogenerate=autogenerate, head="base",
                                  branch_label=branch, version_path=str(folder),
                                  rev_id=f"{branch}_0001")
    assert script is not None
    assert not isinstance(script, list)
    return Path(script.path)
