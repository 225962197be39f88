"""Batch names are stored in Unicode NFC.

A name typed as ``é`` (one character, NFC) and as ``e`` plus a combining accent (NFD, as macOS
file names and some keyboards give it) looked the same everywhere, but the database compared code
points: the same manifest saved the other way made a second batch that rendered and billed every
job again. Names are now stored and looked up in NFC (``jobs.batch_names``); this rewrites the
names stored in another form, so that the manifest that stored one finds its batch again.

A name is rewritten only when no other stored batch has the same NFC form: two batches stored
under one name in two spellings are both kept as they are (renaming either would merge their
names, and which jobs belong to which stays the user's call). Looking either up by that name is
then refused as ambiguous, in one line naming both ids (``jobs.store.batches``); by id, each is
found as before. A name whose NFC form would not fit the column (255 characters: NFC lengthens a
few rare characters) is left too. Output folders are unchanged: they were named by the NFC form
already (``jobs.outputs.slug``).

A downgrade changes nothing: which spelling a name was stored in before is not kept, and the NFC
one is a name the older code takes as it is.

Revision ID: 0041
Revises: 0040
Create Date: 2026-12-26 12:00:00
"""

from __future__ import annotations

import unicodedata
from collections import defaultdict
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0041"
down_revision: str | Sequence[str] | None = "0040"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: ``batches.name``'s length (``String(255)``).
NAME_CHARS = 255


def renames(names: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``(id, NFC name)`` for each stored ``(id, name)`` not in NFC whose NFC form no other
    batch's name has (see the module's text)."""
    by_form: defaultdict[str, list[tuple[str, str]]] = defaultdict(list)
    for batch_id, name in names:
        by_form[unicodedata.normalize("NFC", name)].append((batch_id, name))
    return [
        (spelt[0][0], form)
        for form, spelt in by_form.items()
        if len(spelt) == 1 and spelt[0][1] != form and len(form) <= NAME_CHARS
    ]


def upgrade() -> None:
    conn = op.get_bind()
    batches = sa.table("batches", sa.column("id", sa.String), sa.column("name", sa.String))
    stored = [(row.id, row.name) for row in conn.execute(sa.select(batches.c.id, batches.c.name))]
    changes = [{"b_id": batch_id, "b_name": name} for batch_id, name in renames(stored)]
    if changes:
        conn.execute(
            batches.update().where(batches.c.id == sa.bindparam("b_id")).values(name=sa.bindparam("b_name")),
            changes,
        )


def downgrade() -> None:
    """Nothing to undo (see the module's text)."""
