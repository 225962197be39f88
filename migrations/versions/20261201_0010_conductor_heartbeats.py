"""Processes that work on batches say so: ``conductor_heartbeats`` (``status`` tells a stopped run).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 03:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conductor_heartbeats",
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),  # UTCDateTime, as 0001
        sa.PrimaryKeyConstraint("owner", "scope", name=op.f("pk_conductor_heartbeats")),
    )


def downgrade() -> None:
    op.drop_table("conductor_heartbeats")
