"""What submits whose outcome stayed unknown may have cost: ``jobs.ambiguous_usd``.

A job leaving ``submit_unknown`` without proof (failed, resent or cancelled) keeps its estimate
counted as possibly billed, so a budget holds against what fal may have charged. The partial
index the budget checks read for pending jobs (``ix_jobs_pending_billed``) now also holds the
pending jobs with such money. Jobs stored before start at 0 (their past is left as it was
counted: the running totals in ``batch_totals`` stay equal to the sums over the jobs).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 20:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Money columns as 0001 made them: NUMERIC, integer nano-units on SQLite.
MONEY = sa.Numeric(24, 9).with_variant(sa.BigInteger(), "sqlite")
PENDING_BILLED = "state = 'pending' AND (actual_usd IS NOT NULL OR ambiguous_usd > {zero})"
#: Zero as the models render it for a money column: NUMERIC(24, 9) on PostgreSQL, an integer of
#: nano-units on SQLite (a new database from the models must equal a migrated one, index text too).
ZERO = {"postgresql": "0E-9", "sqlite": "0"}
PENDING_BILLED_BEFORE = sa.text("state = 'pending' AND actual_usd IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("ambiguous_usd", MONEY, nullable=False, server_default="0"))
    op.drop_index("ix_jobs_pending_billed", table_name="jobs")
    op.create_index(
        "ix_jobs_pending_billed",
        "jobs",
        ["state", "batch_id", "submitted_at", "actual_usd", "ambiguous_usd"],
        postgresql_where=sa.text(PENDING_BILLED.format(zero=ZERO["postgresql"])),
        sqlite_where=sa.text(PENDING_BILLED.format(zero=ZERO["sqlite"])),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_pending_billed", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("ambiguous_usd")
    op.create_index(
        "ix_jobs_pending_billed",
        "jobs",
        ["state", "batch_id", "submitted_at", "actual_usd"],
        postgresql_where=PENDING_BILLED_BEFORE,
        sqlite_where=PENDING_BILLED_BEFORE,
    )
