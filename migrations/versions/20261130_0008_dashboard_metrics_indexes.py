"""Indexes for the operator's view (issue #14).

* ``ix_jobs_batch_id_item_order``: the dashboard's batch page lists a batch's jobs in item order,
  keyset-paginated (``WHERE batch_id = … AND (item_index, variant, id) > …``); without it a page
  of a 100k-job batch sorts the whole batch.
* ``ix_job_events_submit_unknown``: a partial index of the events that entered
  ``submit_unknown``, so ``/metrics`` counts ambiguous submits without scanning every event.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SUBMIT_UNKNOWN = sa.text("to_state = 'submit_unknown'")


def upgrade() -> None:
    op.create_index("ix_jobs_batch_id_item_order", "jobs", ["batch_id", "item_index", "variant", "id"])
    op.create_index(
        "ix_job_events_submit_unknown",
        "job_events",
        ["job_id"],
        postgresql_where=SUBMIT_UNKNOWN,
        sqlite_where=SUBMIT_UNKNOWN,
    )


def downgrade() -> None:
    op.drop_index("ix_job_events_submit_unknown", table_name="job_events")
    op.drop_index("ix_jobs_batch_id_item_order", table_name="jobs")
