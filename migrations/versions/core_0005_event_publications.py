"""core: the event-publication registry

Revision ID: core_0005
Revises: core_0004
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "core_0005"
down_revision: str | None = 'core_0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # No foreign key to outbox_messages: a job may write its row first (core/messaging/publications.py).
    op.create_table(
        "event_publications",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("message_id", sa.Uuid(), nullable=False),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("published_at", TS, nullable=True),
        sa.Column("completed_at", TS, nullable=True),
        sa.Column("failed_at", TS, nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("resubmissions", sa.Integer(), nullable=False),
        sa.Column("resubmitted_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_publications")),
        sa.UniqueConstraint("message_id", "task", name="uq_event_publications_message_task"),
    )
    op.create_index("ix_event_publications_status_published", "event_publications",
                    ["status", "published_at"])
    op.create_index("ix_event_publications_status_completed", "event_publications",
                    ["status", "completed_at"])


def downgrade() -> None:
    op.drop_index("ix_event_publications_status_completed", table_name="event_publications")
    op.drop_index("ix_event_publications_status_published", table_name="event_publications")
    op.drop_table("event_publications")
