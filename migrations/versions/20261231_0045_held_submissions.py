"""``held_submissions``: a submit whose request id the database refused, held by a live process.

When fal accepted a submit but the database refused to record its request id (a trigger, a
constraint, a value out of range, a bug), the process that sent it keeps it in its journal on
its own host and tries again every 30 s, leaving the job alone meanwhile. Only that process
knew it: another process's reconciler (the distributed workers' tick leader on another host, a
second ``run``) called the job's outcome unknown once its lease ran out, and by
``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` sent it, and paid for it, a second time. The holder
now marks the job here, renewing the mark while it holds it; every reconciler leaves a job with
a fresh mark alone.

Revision ID: 0045
Revises: 0044
Create Date: 2026-12-31 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0045"
down_revision: str | Sequence[str] | None = "0044"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "held_submissions",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),  # UTCDateTime, as 0001
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_held_submissions")),
    )


def downgrade() -> None:
    op.drop_table("held_submissions")
