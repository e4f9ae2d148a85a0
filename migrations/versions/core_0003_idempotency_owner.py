"""core: owner token of an in-flight idempotency claim

Revision ID: core_0003
Revises: core_0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "core_0003"
down_revision: str | None = 'core_0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=32), nullable=False, server_default=""))
    # Claims made before leases existed held their key for the whole TTL; let them go now.
    op.execute("UPDATE idempotency_keys SET expires_at = CURRENT_TIMESTAMP WHERE state = 'in_flight'")


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_column("owner")
