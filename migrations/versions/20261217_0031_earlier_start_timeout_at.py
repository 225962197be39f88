"""``jobs.earlier_start_timeout_at``: the start timeout a job held when its current POST was recorded.

A resend of a submit whose outcome stayed unknown writes its own start timeout
(``start_timeout_at``) right before its POST. When fal refuses that POST (429) or it never goes
out after all, the resend is given back, and the request still possibly at fal is the earlier
attempt's: its start timeout must be the job's again, or a proof of that attempt adopted
afterwards keeps the refused POST's (a schedule removed since: none) and fal's unbilled
``request_timeout`` of it counts an attempt. The value the POST replaced is kept here, so the
give-back can put it back. Existing rows get NULL: a resend whose POST was recorded before the
upgrade and is given back after it keeps no start timeout, and the batch's schedule then decides,
as for a job sent before 0030.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-17 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0031"
down_revision: str | Sequence[str] | None = "0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # UTCDateTime, as 0001
        batch.add_column(sa.Column("earlier_start_timeout_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("earlier_start_timeout_at")
