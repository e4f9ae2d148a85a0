"""Per-module migration histories: each module owns a branch; enabling or removing one touches no other.

Runs on SQLite files (the histories are the same on PostgreSQL; tests/test_cli.py migrates both).
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from core.module import load_modules
from migrations import (
    CORE_VERSIONS,
    LEGACY,
    alembic_config,
    downgrade,
    module_history,
    targets,
    upgrade,
)
from tests.support.settings import make_settings

ALL = ("users", "items", "billing")


def stamped(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        return {row[0] for row in connection.execute("SELECT version_num FROM alembic_version")}


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def settings_for(path: Path, modules: tuple[str, ...] = ALL):  # type: ignore[no-untyped-def]
    return make_settings(database_url=f"sqlite+aiosqlite:///{path}", modules=modules)


async def migrate(path: Path, modules: tuple[str, ...] = ALL, revision: str | None = None) -> None:
    await asyncio.to_thread(upgrade, settings_for(path, modules), revision)


class TestLayout:
    @pytest.mark.parametrize("name", ALL)
    def test_each_module_owns_one_branch_in_its_own_folder(self, name: str) -> None:
        script = ScriptDirectory.from_config(alembic_config(make_settings()))
        folder = module_history(name)
        assert folder is not None, f"modules/{name}/migrations is missing"
        here = {r.revision: r for r in script.walk_revisions() if Path(r.path).parent == folder}
        bases = [r for r in here.values() if r.down_revision is None]
        assert [tuple(r.branch_labels) for r in bases] == [(name,)]
        # Every revision in the folder descends from the module's own base, never from another's.
        for revision in here.values():
            assert revision.down_revision is None or revision.down_revision in here

    def test_the_tables_of_a_module_are_created_by_its_own_history(self, tmp_path: Path) -> None:
        for module in load_modules(ALL):
            script = ScriptDirectory.from_config(alembic_config(make_settings()))
            folder = module_history(module.name)
            sources = "".join(Path(r.path).read_text() for r in script.walk_revisions()
                              if Path(r.path).parent == folder)
            for table in module.tables:
                assert f'"{table}"' in sources, f"{table} is not created in modules/{module.name}/migrations"

    def test_core_history_holds_only_core_tables(self) -> None:
        sources = "".join(p.read_text() for p in CORE_VERSIONS.glob("*.py"))
        for module in load_modules(ALL):
            for table in module.tables:
                assert f'create_table(\n        "{table}"' not in sources


class TestUpgrade:
    def test_targets_are_core_and_the_enabled_modules(self) -> None:
        assert targets(make_settings(modules=("users", "items"))) == ["core@head", "users@head", "items@head"]

    async def test_a_module_is_added_without_touching_the_others(self, tmp_path: Path) -> None:
        db = tmp_path / "atrium.db"
        await migrate(db, ("users", "items"))
        assert "invoices" not in tables(db)
        before = stamped(db)

        await migrate(db, ALL)

        assert {"invoices", "invoice_lines", "payments"} <= tables(db)
        assert stamped(db) == before | {"billing_0002"}

    async def test_a_removed_module_leaves_the_others_migratable(self, tmp_path: Path) -> None:
        db = tmp_path / "atrium.db"
        await migrate(db, ALL)

        await migrate(db, ("users", "items"))  # billing's revision is still known: no error

        assert "billing_0002" in stamped(db)

    async def test_one_module_can_be_rolled_back_alone(self, tmp_path: Path) -> None:
        db = tmp_path / "atrium.db"
        await migrate(db, ALL)

        await asyncio.to_thread(downgrade, settings_for(db), "billing@base")

        assert not {"invoices", "invoice_lines", "payments"} & tables(db)
        assert {"users", "items", "outbox_messages"} <= tables(db)
        assert not {"billing_0001", "billing_0002"} & stamped(db)


class TestLegacyHistory:
    @pytest.mark.parametrize("legacy", ["0003", "0005"])
    async def test_a_database_of_the_single_history_is_restamped_and_upgraded(
        self, tmp_path: Path, legacy: str
    ) -> None:
        db = tmp_path / "old.db"
        # Build exactly the schema the old linear history had at ``legacy``, stamped the old way.
        for revision in LEGACY[legacy]:
            await migrate(db, ALL, revision)
        with sqlite3.connect(db) as connection:
            connection.execute("DELETE FROM alembic_version")
            connection.execute("INSERT INTO alembic_version VALUES (?)", (legacy,))

        await migrate(db, ALL)

        assert stamped(db) == {"core_0005", "users_0002", "items_0001", "billing_0002"}
        with sqlite3.connect(db) as connection:
            columns = {row[1] for row in connection.execute("PRAGMA table_info(idempotency_keys)")}
        assert "owner" in columns
        assert {"invoices", "payments"} <= tables(db)


class TestNewRevision:
    @pytest.fixture
    def project(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        """A copy of the modules' histories, so new revisions land in a scratch tree."""
        import shutil

        import migrations

        root = tmp_path / "modules"
        for name in ALL:
            folder = module_history(name)
            assert folder is not None
            shutil.copytree(folder, root / name / "migrations")
        (root / "widgets").mkdir()
        monkeypatch.setattr(migrations, "MODULES_ROOT", root)
        return root

    def test_a_new_module_starts_its_own_branch(self, project: Path) -> None:
        from migrations import new_revision

        path = new_revision(make_settings(), "widgets", "widgets: first tables")

        assert path.parent == project / "widgets" / "migrations"
        text = path.read_text()
        assert 'revision: str = "widgets_0001"' in text
        assert "down_revision: str | None = None" in text
        assert 'branch_labels: str | Sequence[str] | None = ("widgets",)' in text
        assert "Revises:\n" in text

    def test_an_existing_module_gets_the_next_revision_on_its_branch(self, project: Path) -> None:
        from migrations import new_revision

        path = new_revision(make_settings(), "items", "items: a column")

        assert path.parent == project / "items" / "migrations"
        assert 'revision: str = "items_0002"' in path.read_text()
        assert 'down_revision: str | None = "items_0001"' in path.read_text()

    def test_an_unknown_module_is_refused(self, project: Path) -> None:
        from migrations import new_revision

        with pytest.raises(ValueError, match="no module folder modules/ghosts"):
            new_revision(make_settings(), "ghosts", "boo")
