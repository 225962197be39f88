"""How many items the manifest a batch stores holds: ``batches.manifest_items``.

A resubmitted manifest that no longer has some of the batch's jobs keeps them, numbered after
its items (``item_index`` from the item count on: :func:`jobs.store.resubmit_jobs`), but the
count itself was not stored: an export could not tell the rows its stored manifest describes
from those of an earlier version of it, and the ``hf`` dataset card called ``manifest.yaml`` the
text every row was made from. Exports now say it per row (``in_manifest``).

Filled for the batches already stored whose manifest text (``manifest_text``) names no
``items_from`` file: the number of its ``items`` (a rerun's text is its parent's, whose items its
jobs keep). NULL for the others (rows of an ``items_from`` file are not stored with the batch,
and a batch stored before its text was kept has none): their ``in_manifest`` is null, unknown,
until their manifest is submitted again.

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
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("manifest_items", sa.Integer(), nullable=True))
    conn = op.get_bind()
    batches = sa.table(
        "batches", sa.column("id", sa.String), sa.column("manifest_text", sa.Text), sa.column("manifest_items")
    )
    found = conn.execute(sa.select(batches.c.id, batches.c.manifest_text).where(batches.c.manifest_text.is_not(None)))
    counted = [{"b_id": batch_id, "b_items": n} for batch_id, text in found if (n := item_count(text)) is not None]
    if counted:
        conn.execute(
            batches.update().where(batches.c.id == sa.bindparam("b_id")).values(manifest_items=sa.bindparam("b_items")),
            counted,
        )


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("manifest_items")
