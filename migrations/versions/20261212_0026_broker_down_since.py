"""``conductor_heartbeats.broker_down_since``: the workers' leader says the broker is unreachable.

During a broker (Redis) outage the leader still beats, so ``status`` said ``processing`` and,
with submits held back, blamed the download backlog, gave an ETA and never named the broker.
The leader now records, on its heartbeat rows, since when the broker has been unreachable
(NULL: it answers), and ``status`` says so instead. Existing rows get NULL.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-12 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0026"
down_revision: str | Sequence[str] | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("conductor_heartbeats") as batch:
        # UTCDateTime, as 0001
        batch.add_column(sa.Column("broker_down_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("conductor_heartbeats") as batch:
        batch.drop_column("broker_down_since")
