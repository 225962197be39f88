"""Reuse, variants and provenance columns (issue #13, second slice).

* ``jobs.variant``: the matrix combination's index within its item (``'0'`` for jobs stored
  before: they were all combination 0 as far as anyone can tell).
* ``jobs.reused_from``: the job whose output a ``reuse_outputs`` job took instead of being sent.
* ``jobs.source_files``: per media field, the path or URL the manifest named and its SHA-256.
* ``jobs.registry_sha256`` / ``jobs.price_table``: the endpoint registry entry's hash and the
  pricing used for the estimate, so a job says which definitions it was sent under.
* ``batches.reuse_outputs``: opt-in reuse (``'0'``: false on both PostgreSQL and SQLite).
* ``batches.manifest_text``: the manifest's text as submitted.
* ``ix_jobs_job_key``: reuse looks up a succeeded job with the same key across batches.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 18:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("variant", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("reused_from", sa.String(32), nullable=True))
        batch.add_column(sa.Column("source_files", _json(), nullable=True))
        batch.add_column(sa.Column("registry_sha256", sa.String(64), nullable=True))
        batch.add_column(sa.Column("price_table", _json(), nullable=True))
        batch.create_index("ix_jobs_job_key", ["job_key"])
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("reuse_outputs", sa.Boolean(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("manifest_text", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("manifest_text")
        batch.drop_column("reuse_outputs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_job_key")
        batch.drop_column("price_table")
        batch.drop_column("registry_sha256")
        batch.drop_column("source_files")
        batch.drop_column("reused_from")
        batch.drop_column("variant")
