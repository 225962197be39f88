"""jobs.not_in_manifest: the manifest its batch was last submitted from no longer has the job.

A resubmit of an edited manifest numbered such jobs after its items (``item_index`` from the
item count on) and kept them, and nothing stored said which they were: the run's exit code,
``status``'s advice and ``rerun --failed-only`` went on judging a failed job whose item was since
fixed, and an export could not tell the rows its stored manifest describes from those of an
earlier version of it. Every resubmit now sets the flag of the jobs it leaves out and clears it
for the others (``jobs.store.resubmit_jobs``); exports say it per row (``in_manifest``).

Filled for the jobs already stored whose batch's manifest text (``manifest_text``) names no
``items_from`` file: a job numbered from the number of its ``items`` on is one an earlier
resubmit left out (a rerun's text is its parent's, whose item numbers its jobs keep). False for
the others (rows of an ``items_from`` file are not stored with the batch, and a batch stored
before its text was kept has none): the next submit of their manifest marks them.

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-25 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import yaml
from alembic import op

revision: str = "0039"
down_revision: str | Sequence[str] | None = "0038"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def item_count(text: str | None) -> int | None:
    """The items of a stored manifest text, when they are all in it (no ``items_from``); else None."""
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("items_from") is not None:
        return None
    items = data.get("items")
    return len(items) if isinstance(items, list) else None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("not_in_manifest", sa.Boolean(), nullable=False, server_default="0"))
    conn = op.get_bind()
    batches = sa.table("batches", sa.column("id", sa.String), sa.column("manifest_text", sa.Text))
    jobs = sa.table(
        "jobs",
        sa.column("batch_id", sa.String),
        sa.column("item_index", sa.Integer),
        sa.column("not_in_manifest", sa.Boolean),
    )
    found = conn.execute(sa.select(batches.c.id, batches.c.manifest_text).where(batches.c.manifest_text.is_not(None)))
    counted = [{"b_id": batch_id, "b_items": n} for batch_id, text in found if (n := item_count(text)) is not None]
    if counted:
        conn.execute(
            jobs.update()
            .where(jobs.c.batch_id == sa.bindparam("b_id"), jobs.c.item_index >= sa.bindparam("b_items"))
            .values(not_in_manifest=True),
            counted,
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("not_in_manifest")
