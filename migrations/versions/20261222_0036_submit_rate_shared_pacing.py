"""``submit_pace``: submit pacing shared through the database when no limiter Redis is.

Processes that share only the database (two embedded ``wanbatch run``, or one beside workers
without a limiter Redis) each paced their POSTs in their own memory: together they could send
up to about twice ``WANBATCH_SUBMIT_RATE`` in one second, and a 429 paused only the process
that heard it. One row per API key, three columns, each in epoch seconds on the database's clock
(PostgreSQL's; on SQLite, the clock of the processes on the file's host):

* ``pace_at``: the next submit's slot (GCRA's theoretical arrival time), taken right before
  each POST while processes share the pacing;
* ``hold_until``: until when fal's 429 holds every process's submits of the key;
* ``shared_until``: until when the pacing is shared (another live process was seen).

A table of its own, not columns of ``submit_rate``: each dispatch round writes that row early
and keeps it locked until it commits, so a slot taken there waited for the whole round. No row:
nothing shared, no pause.

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-22 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0036"
down_revision: str | Sequence[str] | None = "0035"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "submit_pace",
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("pace_at", sa.Float(), nullable=True),
        sa.Column("hold_until", sa.Float(), nullable=True),
        sa.Column("shared_until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("api_key_id", name=op.f("pk_submit_pace")),
    )


def downgrade() -> None:
    op.drop_table("submit_pace")
