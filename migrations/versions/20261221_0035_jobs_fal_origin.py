"""jobs.fal_origin: the fal queue origin (scheme://host:port) an attempt was sent to.

Only a process whose ``WANBATCH_FAL_QUEUE_URL`` has that origin asks about the request
(status, stream, result, cancel): another fal (a simulator, another deployment) never had
it and answers 404, which ended paid jobs as "provider lost the request". NULL for requests
sent before this column: any process follows them, as before.

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
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("fal_origin", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("fal_origin")
