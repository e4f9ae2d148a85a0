"""${message}

Revision ID: ${up_revision}
Revises:${" " + (down_revision if isinstance(down_revision, str) else ", ".join(down_revision)) if down_revision else ""}
Create Date: ${create_date}
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision: str = "${up_revision}"
down_revision: str | None = ${'"%s"' % down_revision if isinstance(down_revision, str) else repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${"(%s,)" % ", ".join('"%s"' % b for b in branch_labels) if branch_labels else None}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
