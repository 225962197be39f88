"""``jobs.start_timeout_at``: when the start timeout a job's current request carried ends.

A submit of a batch with a window or deadline carries ``X-Fal-Request-Start-Timeout`` up to the
window's end or the deadline; fal ends the request unstarted then (``request_timeout``, not
billed), and such a timeout is not counted against ``WANBATCH_MAX_ATTEMPTS``. Whether the request
carried one was read from the batch's schedule *now*, so removing the schedule while such
requests waited at fal made their timeouts ordinary failures, each counting an attempt. The
instant is now recorded with the POST (NULL: it carried none). Existing rows get NULL, and for
them the batch's schedule decides, as before.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-16 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0030"
down_revision: str | Sequence[str] | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # UTCDateTime, as 0001
        batch.add_column(sa.Column("start_timeout_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("start_timeout_at")
