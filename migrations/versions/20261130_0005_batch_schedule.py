"""batches.schedule, batches.priority, batches.paused_by_user: overnight renders (issue #12).

``schedule`` is :meth:`jobs.schedule.Schedule.as_json` (NULL: send whenever), ``priority`` the
fal queue priority of every submit, and ``paused_by_user`` what ``wanbatch pause`` sets: a flag
beside ``state``, not a state, so a batch fal's refusal paused stays paused after ``resume`` and a
user's pause survives the batch being paused or resumed for other reasons. Both have server
defaults so batches stored before this revision read as "normal" and "not paused" (``'0'``: the
one literal both PostgreSQL's boolean and SQLite's integer-backed one read as false).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 08:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column("schedule", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True)
        )
        batch.add_column(sa.Column("priority", sa.String(8), nullable=False, server_default="normal"))
        batch.add_column(sa.Column("paused_by_user", sa.Boolean(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("paused_by_user")
        batch.drop_column("priority")
        batch.drop_column("schedule")
