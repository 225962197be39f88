"""``ix_job_events_adopted``: the few events of jobs adopted from the outputs folder.

``status`` (and ``run``'s summary) counts, per batch, the jobs that were adopted from their
sidecar and verified video on disk rather than sent (a database restored from an older backup).
Those jobs are told by one event's reason; without an index the count read every event of every
succeeded job of the batch on each ``status`` (about 600,000 rows for a 100,000-job batch). This
partial index holds only those events, so the count reads as many rows as jobs were adopted,
usually none.

Revision ID: 0047
Revises: 0046
Create Date: 2027-01-02 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0047"
down_revision: str | Sequence[str] | None = "0046"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ADOPTED = sa.text("reason = 'adopted from outputs on disk'")


def upgrade() -> None:
    op.create_index(
        "ix_job_events_adopted", "job_events", ["job_id"], postgresql_where=ADOPTED, sqlite_where=ADOPTED
    )


def downgrade() -> None:
    op.drop_index("ix_job_events_adopted", table_name="job_events")
