"""A batch says whether it was simulated: ``batches.simulated`` (``--simulate`` runs).

Batches stored before count as sent to fal (``'0'``: false on both PostgreSQL and SQLite):
nothing recorded which ones a ``--simulate`` run made.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 06:05:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("simulated", sa.Boolean(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("simulated")
