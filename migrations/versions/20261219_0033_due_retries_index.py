"""``ix_jobs_batch_id_state_next_attempt_at``: a batch's due retries, apart from those still backing off.

A dispatch round looked for due ``retry_wait`` jobs by reading a batch's ``retry_wait`` jobs in
claim order (``ix_jobs_batch_id_state_order``) and skipping those whose ``next_attempt_at`` was
still to come: a 5xx outage leaves thousands of them waiting out their backoff, and every round
read them all (12 ms per round at 8,000). It now finds the due ones of a batch through this index
(those of every batch through ``ix_jobs_state_next_attempt_at``): ``store._due_retries``.

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-19 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0033"
down_revision: str | Sequence[str] | None = "0032"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_batch_id_state_next_attempt_at", "jobs", ["batch_id", "state", "next_attempt_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_id_state_next_attempt_at", table_name="jobs")
