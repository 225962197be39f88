"""Possible duplicate charges count resends that went out: ``jobs.resend_attempt``.

``possible_duplicate_charges`` counted a submit whose outcome stayed unknown as resent the
moment ``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` moved it to ``retry_wait``; a job cancelled
there (a budget, a cancel, a deadline) was counted though it was never sent again. Now that
move marks the attempt that resends it (``resend_attempt``), and the count grows only when that
attempt's POST is recorded as sent.

Jobs stored before whose resend never went out — their move to ``retry_wait`` after
``submit_unknown`` was not followed by ``submitting`` (they still wait, or ended without it) —
lose that count and are marked as owing it: a job still waiting is counted when it is sent. A
downgrade counts every resend owed and not sent again, as before.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019"
down_revision: str | Sequence[str] | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: A job's move to ``retry_wait`` to resend an unknown submit, not followed by a send.
UNSENT_RESEND = """EXISTS (
    SELECT 1 FROM job_events e
    WHERE e.job_id = jobs.id AND e.from_state = 'submit_unknown' AND e.to_state = 'retry_wait'
    AND COALESCE((
        SELECT n.to_state FROM job_events n
        WHERE n.job_id = e.job_id AND n.version > e.version
        ORDER BY n.version LIMIT 1
    ), 'none') <> 'submitting'
)"""
#: (S608: built from this module's constant SQL, never from a value.)
UNCOUNT = (
    "UPDATE jobs SET possible_duplicate_charges = possible_duplicate_charges - 1, "  # noqa: S608
    f"resend_attempt = attempts + 1 WHERE possible_duplicate_charges > 0 AND {UNSENT_RESEND}"
)
#: Before: a resend was counted when decided, sent or not.
RECOUNT = (
    "UPDATE jobs SET possible_duplicate_charges = possible_duplicate_charges + 1 "
    "WHERE resend_attempt > attempts"
)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resend_attempt", sa.Integer(), nullable=True))
    op.get_bind().execute(sa.text(UNCOUNT))


def downgrade() -> None:
    op.get_bind().execute(sa.text(RECOUNT))
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resend_attempt")
