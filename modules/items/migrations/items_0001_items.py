"""items: the catalog

Revision ID: items_0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "items_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("items",)
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "items",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("name_key", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("price", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
    )
    op.create_index(
        "ix_items_name_key", "items", ["name_key", "id"], postgresql_ops={"name_key": "varchar_pattern_ops"}
    )
    op.create_index("ix_items_price", "items", ["price", "id"])


def downgrade() -> None:
    op.drop_index("ix_items_price", table_name="items")
    op.drop_index("ix_items_name_key", table_name="items")
    op.drop_table("items")
