"""``fal_holds``: a process that cannot connect to fal says so, for ``status`` and the dashboard.

A process whose submits cannot connect to fal holds them and probes after a pause growing from
1 s to 60 s (``worker.steps.fal_reach``). Only its own progress line said so: ``status`` and
the dashboard showed the held jobs ``pending`` with no reason, and a distributed worker on
another host said nothing anywhere an operator looks. The process now records the hold here
(since when, the next probe, the last error) when it begins, renews it while it probes, and
deletes it when fal answers.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-13 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0027"
down_revision: str | Sequence[str] | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fal_holds",
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),  # UTCDateTime, as 0001
        sa.Column("next_probe_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pause_seconds", sa.Float(), nullable=False),
        sa.Column("error", sa.String(length=255), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("owner", "scope", name=op.f("pk_fal_holds")),
    )


def downgrade() -> None:
    op.drop_table("fal_holds")
