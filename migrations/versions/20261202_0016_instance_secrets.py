"""A database's own random secrets: ``instance_secrets``.

Its first, ``webhook``, keys the token every ``fal_webhook`` URL now carries: fal signs every
account's webhooks with the same keys, so only the token shows that a delivery's job id and
attempt came from one of this database's submits.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 21:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | Sequence[str] | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "instance_secrets",
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),  # UTCDateTime, as 0001
        sa.PrimaryKeyConstraint("name", name=op.f("pk_instance_secrets")),
    )


def downgrade() -> None:
    op.drop_table("instance_secrets")
