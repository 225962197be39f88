"""jobs.media, jobs.media_mismatch: every downloaded video is probed (issue #13).

``media`` is the probed figures (width, height, frames, fps, duration, codec) as JSON, and
``media_mismatch`` what differed from the request, in words. Both nullable: jobs stored before
this revision were never probed, and NULL mismatch means "matched" (or "not probed").

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("media", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True)
        )
        batch.add_column(sa.Column("media_mismatch", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("media_mismatch")
        batch.drop_column("media")
