"""The submit rate's token bucket, shared by every process dispatching: ``submit_rate``.

Two ``wanbatch run`` side by side (or one beside the workers' tick leader) each kept the bucket
in memory and together claimed twice ``WANBATCH_SUBMIT_RATE``. Dispatch rounds already take
turns across processes (``lock_dispatch``); they now take their tokens from this row too.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-01 23:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | Sequence[str] | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "submit_rate",
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("stamp", sa.DateTime(timezone=True), nullable=False),  # UTCDateTime, as 0001
        sa.PrimaryKeyConstraint("api_key_id", name=op.f("pk_submit_rate")),
    )


def downgrade() -> None:
    op.drop_table("submit_rate")
