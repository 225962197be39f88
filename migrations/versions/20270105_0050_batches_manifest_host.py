"""``batches.manifest_host``: the machine a batch's manifest path is a path of.

On a database several machines share, a manifest of another project with the same ``name:``
from another machine was taken for the batch's project moved: the first project's file is not
there on the second machine (or, with the same path on both, no move was even considered), so
its jobs were dropped as "no longer in its manifest" and its budget cap replaced. A batch now
records the machine its manifest was submitted from (``jobs.machine``: ``HOST@MACHINE-ID``, or
``HOST``), and a manifest from another machine must ask for every job of the batch, or be given
``--take-over``.

NULL for every batch stored before: the machine is not known, and those batches behave as
before until a submit records it. A downgrade drops the column (the older code compares paths).

Revision ID: 0050
Revises: 0049
Create Date: 2027-01-05 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0050"
down_revision: str | Sequence[str] | None = "0049"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("manifest_host", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("manifest_host")
