"""``ix_jobs_to_send_batch_id``: the batches that have jobs to send, apart from the finished ones.

A dispatch round now shares the free slots between the batches with jobs to send (``pending``,
or waiting for a retry) instead of giving them all to the oldest jobs: it first finds those
batches, one look per batch through this partial index (a loose index scan), then reads each
one's due jobs. Probing every active batch instead cost a round one index look per batch ever
submitted (batches stay ``active`` when their jobs are all finished): 4 ms a round on
PostgreSQL at 300 of them. Only jobs in those two states are in it.

Revision ID: 0044
Revises: 0043
Create Date: 2026-12-30 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0044"
down_revision: str | Sequence[str] | None = "0043"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TO_SEND = sa.text("state IN ('pending', 'retry_wait')")


def upgrade() -> None:
    op.create_index(
        "ix_jobs_to_send_batch_id", "jobs", ["batch_id"], postgresql_where=TO_SEND, sqlite_where=TO_SEND
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_to_send_batch_id", table_name="jobs")
