"""``conductor_heartbeats.limits``: the account-wide limits each dispatching process runs with.

Several embedded ``wanbatch run`` (or one beside the workers' tick leader) sharing a database and
a fal account each dispatched with their own ``WANBATCH_MAX_OUTSTANDING`` and
``WANBATCH_SUBMIT_RATE``: with 40 in one and 10 in another, 21 requests were at fal at once, and
the submit rate was exceeded the same way, while nothing told the processes (or ``doctor``) that
they differed. Each dispatching process now publishes its own limits with its heartbeat, applies
the strictest of the live ones, and names the others that differ.

NULL for the rows of processes that publish nothing (a ``serve``, a worker that does not lead, an
earlier version): they are not compared. A downgrade drops the column.

Revision ID: 0051
Revises: 0050
Create Date: 2027-01-06 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0051"
down_revision: str | Sequence[str] | None = "0050"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("conductor_heartbeats") as batch:
        batch.add_column(
            sa.Column("limits", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("conductor_heartbeats") as batch:
        batch.drop_column("limits")
