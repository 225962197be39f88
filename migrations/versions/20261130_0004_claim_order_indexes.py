"""Indexes that let a claim read due jobs oldest first and stop at its limit.

``ix_jobs_batch_id_state`` (batch_id, state) becomes (batch_id, state, created_at, item_index,
id), and (state, created_at, item_index, id) is added for claims across every batch: with
only the old index, each claim sorted every due job of the batch (25 ms at 20,000 jobs, on
every completion).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_jobs_batch_id_state", table_name="jobs")
    op.create_index(
        "ix_jobs_batch_id_state_order", "jobs", ["batch_id", "state", "created_at", "item_index", "id"]
    )
    op.create_index("ix_jobs_state_order", "jobs", ["state", "created_at", "item_index", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_order", table_name="jobs")
    op.drop_index("ix_jobs_batch_id_state_order", table_name="jobs")
    op.create_index("ix_jobs_batch_id_state", "jobs", ["batch_id", "state"])
