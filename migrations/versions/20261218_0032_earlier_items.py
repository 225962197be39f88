"""``jobs.earlier_items``: the item numbers a resubmit of an edited manifest took from a job.

A video's file name holds its job's item number, and a resubmit may change that number: a video
an earlier try saved (renamed into place, then killed before recording the success) waits under
the old one. To find such a file, every download listed its batch's whole output folder — every
video so far — which made a batch quadratic in its size (10^10 directory entries read over a
100,000-job batch). The resubmit now appends the old number to the job's ``earlier_items`` (a
JSON list, most recent last, the last 8 kept), and the download looks under exactly those names,
one ``stat`` each: no listing, and no time compared (a resubmit's host and a worker's need not
agree on the clock).

Existing rows get NULL, but for the jobs not finished yet that were sent: one may have been
renumbered before the column existed, and nobody knows from which number, so it gets ``[-1]``
(``jobs.models.EARLIER_ITEMS_UNKNOWN``): its download lists the folder, as every download did
before.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-18 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0032"
down_revision: str | Sequence[str] | None = "0031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # JSONDoc, as 0001
        batch.add_column(
            sa.Column(
                "earlier_items", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
            )
        )
    op.execute(
        "UPDATE jobs SET earlier_items = '[-1]' WHERE submitted_at IS NOT NULL"
        " AND state NOT IN ('succeeded', 'failed', 'cancelled')"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("earlier_items")
