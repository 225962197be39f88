"""jobs.not_in_manifest: the manifest its batch was last submitted from no longer has the job.

A resubmit of an edited manifest numbered such jobs after its items and kept them, and nothing
stored said which they were: the run's exit code, ``status``'s advice and ``rerun --failed-only``
went on judging a failed job whose item was since fixed. Every resubmit now sets the flag of the
jobs it leaves out and clears it for the others (``jobs.store.resubmit_jobs``). False for every
job stored before: which jobs an earlier resubmit left out is not recorded (a manifest's items
may come from a file beside it), and the next submit of the manifest marks them.

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-25 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0039"
down_revision: str | Sequence[str] | None = "0038"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("not_in_manifest", sa.Boolean(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("not_in_manifest")
