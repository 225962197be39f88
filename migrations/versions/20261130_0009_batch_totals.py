"""Finished jobs' money kept per batch, for the budget check (issue #11).

* ``batch_totals``: one row per batch, ``finished_usd`` = what its succeeded, failed and
  cancelled jobs were billed (a succeeded job with no reported cost counts its estimate). Filled
  here from the jobs already finished; kept from now on by the transaction that finishes a job.
* ``ix_jobs_pending_billed``: the few pending jobs an earlier attempt billed, so the budget check
  need not read the pending jobs that never ran.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING_BILLED = sa.text("state = 'pending' AND actual_usd IS NOT NULL")

# Each finished job's share, as store.finished_usd computes it (money is stored as integer
# micro-dollars on SQLite and as NUMERIC on PostgreSQL: the same SQL sums either exactly).
FINISHED = """
INSERT INTO batch_totals (batch_id, finished_usd)
SELECT b.id, COALESCE((
    SELECT SUM(CASE WHEN j.state = 'succeeded' THEN COALESCE(j.actual_usd, j.est_usd)
                    ELSE COALESCE(j.actual_usd, 0) END)
    FROM jobs j
    WHERE j.batch_id = b.id AND j.state IN ('succeeded', 'failed', 'cancelled')
), 0)
FROM batches b
"""


def upgrade() -> None:
    op.create_table(
        "batch_totals",
        sa.Column("batch_id", sa.String(length=32), nullable=False),
        sa.Column(
            "finished_usd",
            sa.Numeric(24, 9).with_variant(sa.BigInteger(), "sqlite"),  # as 0001's money columns
            server_default="0",
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_batch_totals_batch_id_batches")),
        sa.PrimaryKeyConstraint("batch_id", name=op.f("pk_batch_totals")),
    )
    op.execute(FINISHED)
    op.create_index(
        "ix_jobs_pending_billed",
        "jobs",
        ["batch_id", "state", "actual_usd"],
        postgresql_where=PENDING_BILLED,
        sqlite_where=PENDING_BILLED,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_pending_billed", table_name="jobs")
    op.drop_table("batch_totals")
