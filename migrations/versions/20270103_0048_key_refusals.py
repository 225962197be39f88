"""``key_refusals``: fal's "not found" (or refusal) of a request sent with another API key.

A request sent with a key of another fal account (or a key since revoked) is unknown to the
current key: fal answers it 404. The process that asked kept that in memory only, so a ``run``
watching distributed workers and a ``cancel`` with workers never learned it: the run waited for
ever, the cancel said the requests were "being cancelled" at fal, and ``cancel
--abandon-other-key`` wrote off requests without asking fal (some the current key, of the same
account, could still fetch). The refusal is now recorded here, per job and asking key, for every
process to read. It starts empty; a downgrade drops it (the older version keeps it in memory).

Revision ID: 0048
Revises: 0047
Create Date: 2027-01-03 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0048"
down_revision: str | Sequence[str] | None = "0047"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_refusals",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("sent_with", sa.String(length=32), nullable=False),
        sa.Column("refused_at", sa.DateTime(timezone=True), nullable=False),  # UTCDateTime, as 0001
        sa.PrimaryKeyConstraint("job_id", "key_id", name=op.f("pk_key_refusals")),
    )


def downgrade() -> None:
    op.drop_table("key_refusals")
