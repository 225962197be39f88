"""``jobs.renumbered_at``: when a resubmit of an edited manifest last changed a job's item number.

A video's file name holds its job's item number, and a resubmit may change that number: a video
an earlier try saved (renamed into place, then killed before recording the success) waits under
the old one. To find such a file, every download listed its batch's whole output folder — every
video so far — which made a batch quadratic in its size (10^10 directory entries read over a
100,000-job batch). The resubmit now stamps the job when it gives it another number, and only a
job stamped no earlier than its current request was sent looks under another number.

Existing rows get NULL, but for the jobs not finished yet that were sent: one may have been
renumbered before the column existed, so it takes its ``submitted_at`` (its current request's
send time), and its next download looks once, as every download did before. A job sent again
later gets a later ``submitted_at`` and no longer looks.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-17 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0032"
down_revision: str | Sequence[str] | None = "0031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # UTCDateTime, as 0001
        batch.add_column(sa.Column("renumbered_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE jobs SET renumbered_at = submitted_at WHERE submitted_at IS NOT NULL"
        " AND state NOT IN ('succeeded', 'failed', 'cancelled')"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("renumbered_at")
