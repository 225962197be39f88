"""Which parent job a rerun's job repeats: ``jobs.rerun_of``.

``wanbatch diff`` paired a rerun's jobs with their parent's by item and variant number, but
``rerun --vary`` numbers each original's combinations anew (``variant × combinations + n``),
so the 720p original met the rerun's 480p job. The rerun now records each job's original.
Jobs stored before are NULL (diff falls back to item and variant for them).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-01 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | Sequence[str] | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("rerun_of", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("rerun_of")
