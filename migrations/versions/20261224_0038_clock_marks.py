"""``clock_marks``: the high-water mark of SQLite's timeline, so a clock step is caught up once.

On SQLite the timeline is this host's clock. After it stepped back (NTP correcting a clock that
ran ahead), each ticking process noticed the step on its own and brought every wait forward by
it: two processes sharing the file moved them twice (a retry due in 30 s came due at once, an
hour early). The one row here holds the latest time any tick read; the tick that finds its time
well before it moves the waits and lowers the mark in the same transaction, so the others find
nothing left to do.

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-24 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0038"
down_revision: str | Sequence[str] | None = "0037"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "clock_marks",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("high_water", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_clock_marks")),
    )


def downgrade() -> None:
    op.drop_table("clock_marks")
