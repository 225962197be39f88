"""webhook_inbox_totals: the webhook inbox's counters, so ``/metrics`` stops reading every delivery.

A scrape summed the whole ``webhook_deliveries`` table (``store.delivery_counts``), which only
grew: applied deliveries were never deleted. The counters (``stored``, ``repeats``, ``ignored``)
are now kept in one row as deliveries are stored and applied, starting from what the inbox held
(counted here once), and applied deliveries older than ``WANBATCH_WEBHOOK_RETENTION`` are
pruned (``store.prune_deliveries``), which takes nothing off them. ``unprocessed`` is counted on
``ix_webhook_deliveries_processed_at``.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-15 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0029"
down_revision: str | Sequence[str] | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "webhook_inbox_totals",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("stored", sa.BigInteger(), nullable=False),
        sa.Column("repeats", sa.BigInteger(), nullable=False),
        sa.Column("ignored", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_inbox_totals")),
    )
    op.execute(
        "INSERT INTO webhook_inbox_totals (id, stored, repeats, ignored) "
        "SELECT 1, COUNT(*), COALESCE(SUM(repeats), 0), "
        "COALESCE(SUM(CASE WHEN outcome LIKE 'ignored%' THEN 1 ELSE 0 END), 0) FROM webhook_deliveries"
    )


def downgrade() -> None:
    op.drop_table("webhook_inbox_totals")
