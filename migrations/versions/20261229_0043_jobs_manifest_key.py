"""``jobs.manifest_key``: the key of the manifest's job that a job already sent stands for.

A resubmit of a manifest edited to write out an endpoint's documented default (or to leave one
out) keeps, as that item's job, the job the batch already sent for the same request
(``jobs.store.creating._match_written_defaults``): the row it had just stored for the new
spelling was deleted again. The job kept its own key, so every later submit of the same
manifest stored that row again, matched it and deleted it: a 100,000-job resubmit that changed
nothing took about three times as long as one of a manifest never edited. The job now records
the manifest's key (NULL for every other job, and for every job stored before: the next submit
of an edited manifest records it), and a resubmit finds it by that key without storing anything
(``ix_jobs_batch_id_manifest_key``, a partial index of the few jobs that have one).

A downgrade drops the column: the older code matches such jobs again at each submit, as before.

Revision ID: 0043
Revises: 0042
Create Date: 2026-12-29 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0043"
down_revision: str | Sequence[str] | None = "0042"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HAS_ONE = sa.text("manifest_key IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("manifest_key", sa.String(length=64), nullable=True))
    op.create_index(
        "ix_jobs_batch_id_manifest_key",
        "jobs",
        ["batch_id", "manifest_key"],
        postgresql_where=HAS_ONE,
        sqlite_where=HAS_ONE,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_batch_id_manifest_key", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("manifest_key")
