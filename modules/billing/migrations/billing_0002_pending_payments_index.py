"""billing: an index of pending payments by last change, for the payment reconciler

Revision ID: billing_0002
Revises: billing_0001
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "billing_0002"
down_revision: str | None = "billing_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_index("ix_payments_pending", "payments", ["updated_at"],
                    postgresql_where=PENDING, sqlite_where=PENDING)


def downgrade() -> None:
    op.drop_index("ix_payments_pending", table_name="payments")
