"""Reruns stored before ``jobs.rerun_of`` existed (0014) say which parent job they repeat.

0014 left ``rerun_of`` NULL for the jobs of reruns already stored, and what reads it — ``rerun
--failed-only`` (which skips a job a rerun already rendered), ``status``'s "rendered since by a
rerun", the dashboard's Rerun-failed button — found no repeat in them: after an upgrade,
``rerun BATCH --failed-only`` sent again, and paid again for, jobs an older rerun had rendered.

Each such job is linked to its parent batch's job the way ``wanbatch diff`` pairs reruns stored
before: by place (item, variant and endpoint: a plain rerun keeps its parent's places), and only
when the match is unambiguous — exactly one job of the parent at that place whose input is the
one a plain rerun of it sends (its stored input, or that input with the seed fal returned). A
job whose input changed (a ``--vary`` value, ``--new-seeds``), whose place the rerun renumbered
(``--vary``), or that matches no job or several stays NULL, as before (``diff`` falls back to
item and variant for it). A downgrade keeps the links: the column is 0014's.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07 12:00:00
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0021"
down_revision: str | Sequence[str] | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_BATCHES = sa.table("batches", sa.column("id", sa.String), sa.column("parent_batch_id", sa.String))
_JOBS = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("batch_id", sa.String),
    sa.column("item_index", sa.Integer),
    sa.column("variant", sa.Integer),
    sa.column("endpoint", sa.String),
    sa.column("input", _JSON),
    sa.column("seed", sa.String),  # decimal text (``BigIntText``)
    sa.column("rerun_of", sa.String),
)
_PLACE = (_JOBS.c.item_index, _JOBS.c.variant, _JOBS.c.endpoint)


def _plain_rerun_inputs(stored: dict[str, Any], seed: str | None) -> list[dict[str, Any]]:
    """What a rerun without ``--vary`` or ``--new-seeds`` sent for a job: its stored input, with
    the seed fal returned when it was known by then."""
    inputs = [stored]
    if seed is not None:
        inputs.append({**stored, "seed": int(seed)})
    return inputs


def upgrade() -> None:
    bind = op.get_bind()
    reruns = bind.execute(
        sa.select(_BATCHES.c.id, _BATCHES.c.parent_batch_id).where(_BATCHES.c.parent_batch_id.is_not(None))
    ).all()
    for batch_id, parent_id in reruns:
        unlinked = bind.execute(
            sa.select(_JOBS.c.id, *_PLACE, _JOBS.c.input).where(
                _JOBS.c.batch_id == batch_id, _JOBS.c.rerun_of.is_(None)
            )
        ).all()
        if not unlinked:
            continue
        places: dict[tuple[Any, ...], list[tuple[str, list[dict[str, Any]]]]] = defaultdict(list)
        for row in bind.execute(
            sa.select(_JOBS.c.id, *_PLACE, _JOBS.c.input, _JOBS.c.seed).where(_JOBS.c.batch_id == parent_id)
        ):
            places[row.item_index, row.variant, row.endpoint].append(
                (row.id, _plain_rerun_inputs(row.input, row.seed))
            )
        links = []
        for job in unlinked:
            origins = [
                origin
                for origin, sent in places.get((job.item_index, job.variant, job.endpoint), ())
                if job.input in sent
            ]
            if len(origins) == 1:
                links.append({"job": job.id, "origin": origins[0]})
        if links:
            bind.execute(
                _JOBS.update()
                .where(_JOBS.c.id == sa.bindparam("job"))
                .values(rerun_of=sa.bindparam("origin")),
                links,
            )


def downgrade() -> None:
    pass  # the links stay: 0014's column, which a downgrade past 0014 drops
