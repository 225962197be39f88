"""Finished jobs' money kept per batch and day, for the budget checks (issue #11).

* ``batch_totals``: per batch and UTC day of the job's last submit (``""``: never sent),
  ``finished_usd`` = what its succeeded, failed and cancelled jobs were billed (a succeeded job
  with no reported cost counts its estimate). Filled here from the jobs already finished; kept
  from now on by the transaction that finishes a job.
* ``ix_jobs_pending_billed``: the few pending jobs an earlier attempt billed, so the budget
  checks need not read the pending jobs that never ran.

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
# nano-units on SQLite and as NUMERIC on PostgreSQL: the same SQL sums either exactly), by its
# batch and the UTC day of its last submit (SQLite keeps UTC timestamps as text).
FILL = """
INSERT INTO batch_totals (batch_id, day, finished_usd)
SELECT batch_id, {day}, SUM(CASE WHEN state = 'succeeded' THEN COALESCE(actual_usd, est_usd)
                                 ELSE COALESCE(actual_usd, 0) END)
FROM jobs
WHERE state IN ('succeeded', 'failed', 'cancelled')
GROUP BY batch_id, {day}
"""
DAY = {
    "sqlite": "COALESCE(substr(submitted_at, 1, 10), '')",
    "postgresql": "COALESCE(to_char(submitted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), '')",
}


def upgrade() -> None:
    op.create_table(
        "batch_totals",
        sa.Column("batch_id", sa.String(length=32), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column(
            "finished_usd",
            sa.Numeric(24, 9).with_variant(sa.BigInteger(), "sqlite"),  # as 0001's money columns
            server_default="0",
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_batch_totals_batch_id_batches")),
        sa.PrimaryKeyConstraint("batch_id", "day", name=op.f("pk_batch_totals")),
    )
    op.create_index("ix_batch_totals_day", "batch_totals", ["day"])
    op.execute(FILL.format(day=DAY[op.get_bind().dialect.name]))
    op.create_index(
        "ix_jobs_pending_billed",
        "jobs",
        ["state", "batch_id", "submitted_at", "actual_usd"],
        postgresql_where=PENDING_BILLED,
        sqlite_where=PENDING_BILLED,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_pending_billed", table_name="jobs")
    op.drop_index("ix_batch_totals_day", table_name="batch_totals")
    op.drop_table("batch_totals")
