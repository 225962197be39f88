"""``submit_rate.hold_until``: a 429 pauses every process that shares the database.

Processes that share only the database (two embedded ``wanbatch run``, or one beside workers
without a limiter Redis) each kept fal's 429 pause in their own memory, so one process's 429 did
not slow the other. The pause is now written on the key's shared submit-rate row, and every
dispatch round honours it. Existing rows get NULL (no pause).

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-21 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0035"
down_revision: str | Sequence[str] | None = "0034"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("submit_rate") as batch:
        # UTCDateTime, as 0001
        batch.add_column(sa.Column("hold_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("submit_rate") as batch:
        batch.drop_column("hold_until")
