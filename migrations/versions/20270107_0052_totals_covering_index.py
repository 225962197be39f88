"""``status`` with no batch reads an index, not every job: ``ix_jobs_batch_id_state_order`` covers the totals.

``status`` (every batch) and the dashboard's batch list sum each batch's jobs per state
(``jobs.listing.totals_of_batches``): counts, money, failures stopped by a cap, the first
submit, the recent finishes. On PostgreSQL that read every job's row — its input and results
too, ten times the pages of an index: 2.4 s for 400,000 jobs of 2,000 batches. The index on
``(batch_id, state, created_at, item_index, id)`` now also holds, in its entries
(``INCLUDE``, PostgreSQL only), every column those sums read, so the query is an index-only
scan. No more index entries per job move: every move changes ``state``, a key of this index,
so each rewrote its entry already (a wider one now). SQLite has no ``INCLUDE``: unchanged there.

Building it reads the jobs table once; a downgrade makes the narrower index again.

Revision ID: 0052
Revises: 0051
Create Date: 2026-12-07 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0052"
down_revision: str | Sequence[str] | None = "0051"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_jobs_batch_id_state_order"
COLUMNS = ["batch_id", "state", "created_at", "item_index", "id"]
#: As ``jobs.models.STATE_ORDER_INCLUDES`` names them, in that order.
INCLUDE = [
    "est_usd",
    "actual_usd",
    "ambiguous_usd",
    "error_type",
    "not_in_manifest",
    "possible_duplicate_charges",
    "confirmed_duplicate_charges",
    "media_mismatch",
    "rate_limited_submits",
    "submitted_at",
    "finished_at",
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index(NAME, table_name="jobs")
    op.create_index(NAME, "jobs", COLUMNS, postgresql_include=INCLUDE)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.drop_index(NAME, table_name="jobs")
    op.create_index(NAME, "jobs", COLUMNS)
