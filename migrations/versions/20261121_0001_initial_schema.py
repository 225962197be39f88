"""Initial schema: batches, jobs, job_events, uploads.

Written with plain SQLAlchemy types (not ``jobs.models``' decorators) so this revision keeps
meaning the same thing when the models change later. The mapping:

* money / billing units (``jobs.models.Money``): ``NUMERIC(24, 9)``; on SQLite ``BIGINT`` nano-units
* seeds (``BigIntText``): ``VARCHAR(40)`` decimal text (fal seeds can exceed a signed BIGINT)
* timestamps (``UTCDateTime``): ``TIMESTAMP WITH TIME ZONE``
* states (``JobState``, ``BatchState``): ``VARCHAR(32)`` holding the enum's value
* JSON documents: ``JSONB`` on PostgreSQL, ``JSON`` elsewhere

Revision ID: 0001
Revises:
Create Date: 2026-11-21 05:50:33
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _money() -> sa.types.TypeEngine[Decimal]:
    return sa.Numeric(24, 9).with_variant(sa.BigInteger(), "sqlite")


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.types.TypeEngine[datetime]:
    return sa.DateTime(timezone=True)


def _state() -> sa.types.TypeEngine[str]:
    return sa.String(32)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("manifest_path", sa.Text(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("parent_batch_id", sa.String(32), nullable=True),
        sa.Column("budget_max_usd", _money(), nullable=True),
        sa.Column("state", _state(), nullable=False),
        sa.Column("pause_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_batch_id"], ["batches.id"], name=op.f("fk_batches_parent_batch_id_batches")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("name", name=op.f("uq_batches_name")),
    )
    op.create_table(
        "uploads",
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("provider_url", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.PrimaryKeyConstraint("content_sha256", name=op.f("pk_uploads")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("batch_id", sa.String(32), nullable=False),
        sa.Column("job_key", sa.String(64), nullable=False),
        sa.Column("item_index", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(255), nullable=False),
        sa.Column("input", _json(), nullable=False),
        sa.Column("submitted_input", _json(), nullable=True),
        sa.Column("state", _state(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("download_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", _ts(), nullable=True),
        sa.Column("next_attempt_at", _ts(), nullable=True),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column("gateway_request_id", sa.String(255), nullable=True),
        sa.Column("status_url", sa.Text(), nullable=True),
        sa.Column("response_url", sa.Text(), nullable=True),
        sa.Column("cancel_url", sa.Text(), nullable=True),
        sa.Column("seed", sa.String(40), nullable=True),
        sa.Column("actual_prompt", sa.Text(), nullable=True),
        sa.Column("output_path", sa.Text(), nullable=True),
        sa.Column("output_sha256", sa.String(64), nullable=True),
        sa.Column("output_bytes", sa.BigInteger(), nullable=True),
        sa.Column("provider_metrics", _json(), nullable=True),
        sa.Column("provider_output", _json(), nullable=True),
        sa.Column("est_billing_units", _money(), nullable=False),
        sa.Column("est_usd", _money(), nullable=False),
        sa.Column("actual_billing_units", _money(), nullable=True),
        sa.Column("actual_usd", _money(), nullable=True),
        sa.Column("possible_duplicate_charges", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_type", sa.String(255), nullable=True),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.Column("submitted_at", _ts(), nullable=True),
        sa.Column("completed_at", _ts(), nullable=True),
        sa.Column("finished_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_jobs_batch_id_batches")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("batch_id", "job_key", name=op.f("uq_jobs_batch_id_job_key")),
    )
    op.create_index("ix_jobs_batch_id_state", "jobs", ["batch_id", "state"])
    op.create_index("ix_jobs_state_next_attempt_at", "jobs", ["state", "next_attempt_at"])
    op.create_index("ix_jobs_request_id", "jobs", ["request_id"])
    op.create_table(
        "job_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("at", _ts(), nullable=False),
        sa.Column("from_state", _state(), nullable=True),
        sa.Column("to_state", _state(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", _json(), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_events_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_events")),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_job_events_job_id", table_name="job_events")
    op.drop_table("job_events")
    op.drop_index("ix_jobs_request_id", table_name="jobs")
    op.drop_index("ix_jobs_state_next_attempt_at", table_name="jobs")
    op.drop_index("ix_jobs_batch_id_state", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("uploads")
    op.drop_table("batches")
