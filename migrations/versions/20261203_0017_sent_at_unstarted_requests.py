"""When a submit's POST went out, and requests fal ended unstarted at a window's end.

* ``jobs.sent_at``: when the current attempt's POST went out (written right before it). A
  submit whose answer is lost (``submit_unknown``) takes it as its ``submitted_at``: the job was
  sent, and the money it may have cost is counted under that day by the daily budget
  (``WANBATCH_DAILY_BUDGET_USD``). Before, such a job kept ``submitted_at`` NULL, its money
  was booked under no day, and the daily cap never saw it.
* ``jobs.unstarted_requests``: of ``attempts``, the requests fal ended in its queue before they
  started because the batch's window closed. They stay in ``attempts`` (the job was sent) but
  not against ``WANBATCH_MAX_ATTEMPTS``. Jobs stored before start at 0: their attempts left
  such requests out.

Jobs stored before whose last submit's outcome stayed unknown after their last recorded submit
get the time it became unknown (its ``job_events`` row, moments after the POST) as their
``submitted_at``, and the money of those already finished moves in ``batch_totals`` from the
day it was booked under (``""`` for a job never answered) to that day: money possibly billed
today counts against today's cap from the upgrade on. A downgrade keeps those ``submitted_at``.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-03 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | Sequence[str] | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The UTC day (``YYYY-MM-DD``, ``""`` for NULL) of a timestamp column, as 0009 computes it.
DAY = {
    "sqlite": "COALESCE(substr({col}, 1, 10), '')",
    "postgresql": "COALESCE(to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD'), '')",
}
#: When the job's last submit became of unknown outcome.
LAST_UNKNOWN = (
    "(SELECT MAX(e.at) FROM job_events e WHERE e.job_id = jobs.id AND e.to_state = 'submit_unknown')"
)
#: Jobs whose last submit was of unknown outcome, after any answer they had.
#: (S608: built from this module's constant SQL, never from a value.)
AFFECTED = (
    "jobs.id IN (SELECT job_id FROM job_events WHERE to_state = 'submit_unknown') "  # noqa: S608
    f"AND (jobs.submitted_at IS NULL OR jobs.submitted_at < {LAST_UNKNOWN})"
)
#: A finished job's share of its batch's money, as ``store.finished_usd`` computes it.
SHARE = (
    "CASE WHEN jobs.state = 'succeeded' THEN COALESCE(jobs.actual_usd, jobs.est_usd) "
    "ELSE COALESCE(jobs.actual_usd, 0) END + jobs.ambiguous_usd"
)
MOVES = """
SELECT batch_id, old_day, new_day, SUM(share) FROM (
    SELECT jobs.batch_id AS batch_id, {old_day} AS old_day, {new_day} AS new_day, {share} AS share
    FROM jobs
    WHERE jobs.state IN ('succeeded', 'failed', 'cancelled') AND {affected}
) moved
GROUP BY batch_id, old_day, new_day
"""
TAKE = "UPDATE batch_totals SET finished_usd = finished_usd - :usd WHERE batch_id = :batch_id AND day = :day"
ADD = (
    "INSERT INTO batch_totals (batch_id, day, finished_usd) VALUES (:batch_id, :day, :usd) "
    "ON CONFLICT (batch_id, day) DO UPDATE SET "
    "finished_usd = batch_totals.finished_usd + excluded.finished_usd"
)
SEND_TIMES = f"UPDATE jobs SET submitted_at = {LAST_UNKNOWN} WHERE {AFFECTED}"  # noqa: S608 (constants above)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))  # UTCDateTime
        batch.add_column(sa.Column("unstarted_requests", sa.Integer(), nullable=False, server_default="0"))
    conn = op.get_bind()
    day = DAY[conn.dialect.name]
    moves = MOVES.format(
        old_day=day.format(col="jobs.submitted_at"),
        new_day=day.format(col=LAST_UNKNOWN),
        share=SHARE,
        affected=AFFECTED,
    )
    for batch_id, old_day, new_day, usd in conn.execute(sa.text(moves)).all():
        if old_day == new_day or not usd:
            continue
        conn.execute(sa.text(TAKE), {"batch_id": batch_id, "day": old_day, "usd": usd})
        conn.execute(sa.text(ADD), {"batch_id": batch_id, "day": new_day, "usd": usd})
    conn.execute(sa.text(SEND_TIMES))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("unstarted_requests")
        batch.drop_column("sent_at")
