"""The options a rerun was made with: ``batches.rerun_options``.

A rerun batch stored its parent (``parent_batch_id``) but not how ``wanbatch rerun`` was asked
(``--failed-only``, ``--new-seeds``, ``--max-usd``, ``--vary``), so the dataset card of an
``hf`` export could not say what command made the batch, and said ``wanbatch run``. JSON:
``{"failed_only": bool, "new_seeds": bool, "max_usd": "40" | null, "vary": ["seed=1..8", …]}``.
NULL for a batch not made by a rerun, and for reruns stored before (their options are unknown).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-04 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0018"
down_revision: str | Sequence[str] | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column(
                "rerun_options", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("rerun_options")
