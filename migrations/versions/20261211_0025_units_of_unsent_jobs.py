"""``jobs.actual_billing_units`` is 0, beside ``actual_usd`` 0, for a job that ended never sent.

A job that ends failed or cancelled without ever being sent (a budget cancel, ``wanbatch
cancel``, an input file changed before its POST left) is billed nothing, for good: the store
wrote its ``actual_usd`` 0 but left ``actual_billing_units`` NULL, so every export showed
``cost_usd`` 0 beside ``billing_units`` null for it, where every other finished job (a reused
one, a failed 422) has both. The store now writes both; this gives the jobs stored before the
same: each failed or cancelled job never sent (``submitted_at`` NULL, the store's own test)
whose ``actual_billing_units`` is NULL and whose ``actual_usd`` is 0 or NULL gets 0 in both.
No money moves: ``batch_totals`` counts a NULL ``actual_usd`` as 0 already. A job with a bill
(``actual_usd`` above 0) is left as it is. A downgrade changes nothing (0 is what they were
meant to hold).

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-11 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0025"
down_revision: str | Sequence[str] | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ZERO_UNSENT = (
    "UPDATE jobs SET actual_billing_units = 0, actual_usd = 0 "
    "WHERE state IN ('failed', 'cancelled') AND submitted_at IS NULL "
    "AND actual_billing_units IS NULL AND COALESCE(actual_usd, 0) = 0"
)


def upgrade() -> None:
    op.get_bind().execute(sa.text(ZERO_UNSENT))


def downgrade() -> None:
    pass
