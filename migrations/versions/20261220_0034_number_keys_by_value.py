"""Stored jobs whose input holds a whole-number float (``guide_scale: 5.0``) are keyed by its value.

Until now a job's key held its numbers as their JSON text: ``guide_scale: 5`` and ``guide_scale:
5.0`` (or a manifest edited from one to the other, or ``rerun --vary guide_scale=5.0``) were two
jobs, both sent and billed, though fal reads both as the same float and renders the same video.
The key now holds each number by its value (:func:`jobs.manifest.keys.numbers_by_value`: a float
that is a whole number as that int). Without this migration a job stored with ``5.0`` would hold a
key the manifest that stored it no longer gives: submitting it again to its batch would add that
job a second time (the batch is idempotent by key) and pay for it again, and ``reuse_outputs``
would never find its video.

Only a job whose stored key is exactly the former rule's for its stored input gets the new one
(files standing in by the SHA-256 their ``source_files`` recorded, the disk never read; data URIs
by their decoded bytes, as since 0022): a key that cannot be reproduced is left as it is. Only
inputs whose stored text holds a whole-number float as Python writes one (``.0``, or an exponent
``e+``) are read at all; every other job's key is the same under both rules. A new key another job
of the same batch holds already (``5`` and ``5.0`` stored as two jobs before) is left to that job:
this one records it in ``content_key``, as 0024 did for data-URI twins, so ``reuse_outputs`` finds
either's video by it. A ``content_key`` of the former rule (a 0024 twin whose input holds such a
float) takes the new one. A downgrade does the reverse, under the same checks.

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-20 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0034"
down_revision: str | Sequence[str] | None = "0033"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_JOBS = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("batch_id", sa.String),
    sa.column("item_index", sa.Integer),
    sa.column("variant", sa.Integer),
    sa.column("state", sa.String),
    sa.column("endpoint", sa.String),
    sa.column("job_key", sa.String),
    sa.column("content_key", sa.String),
    sa.column("input", _JSON),
    sa.column("source_files", _JSON),
)
#: Jobs read at a time (a data URI may be several MB).
_CHUNK = 200


def _keys(row: Any) -> tuple[str, str] | None:
    """The job's key under the former rule (numbers as written) and under the new one (numbers
    by value); None when its endpoint is unknown or its input no object."""
    from jobs.endpoints import get_endpoint, known_endpoint_ids
    from jobs.manifest.keys import key_of, stored_keyed_input

    if row.endpoint not in known_endpoint_ids() or not isinstance(row.input, dict):
        return None
    spec = get_endpoint(row.endpoint)
    sources = row.source_files if isinstance(row.source_files, dict) else None
    keyed = stored_keyed_input(spec, row.input, sources)
    # The new rule as it stood until schema 0042 (line breaks keyed as written).
    return key_of(spec.id, keyed, numbers_as_written=True), key_of(spec.id, keyed, breaks_as_written=True)


def _rekey(upgrading: bool) -> None:
    bind = op.get_bind()
    stored = sa.cast(_JOBS.c.input, sa.Text)
    floats = sa.or_(stored.like("%.0%"), stored.like("%e+%"), stored.like("%E+%"))
    # Of two jobs of a batch that now share a key, a succeeded one takes it first (as 0022).
    done = sa.case((_JOBS.c.state == "succeeded", 0), else_=1)
    order = (done, _JOBS.c.item_index, _JOBS.c.variant, _JOBS.c.id)
    ids = list(bind.execute(sa.select(_JOBS.c.id).where(floats).order_by(*order)).scalars())
    for start in range(0, len(ids), _CHUNK):
        rows = bind.execute(
            sa.select(
                _JOBS.c.id,
                _JOBS.c.batch_id,
                _JOBS.c.endpoint,
                _JOBS.c.job_key,
                _JOBS.c.content_key,
                _JOBS.c.input,
                _JOBS.c.source_files,
            )
            .where(_JOBS.c.id.in_(ids[start : start + _CHUNK]))
            .order_by(*order)
        ).all()
        for row in rows:
            keys = _keys(row)
            if keys is None or keys[0] == keys[1]:
                continue
            old, new = keys
            was, becomes = (old, new) if upgrading else (new, old)
            values: dict[str, str | None] = {}
            if row.job_key == was:
                taken = bind.execute(
                    sa.select(_JOBS.c.id).where(_JOBS.c.batch_id == row.batch_id, _JOBS.c.job_key == becomes)
                ).first()
                if taken is None:
                    values["job_key"] = becomes
                elif upgrading:
                    values["content_key"] = new  # its twin holds the key its input gives now
            if row.content_key == was:
                # A 0024 twin's content key moves with the rule; one this migration set (its
                # job key is the former rule's) is dropped on the way down.
                values["content_key"] = None if not upgrading and row.job_key == old else becomes
            if values:
                bind.execute(_JOBS.update().where(_JOBS.c.id == row.id).values(**values))


def upgrade() -> None:
    _rekey(upgrading=True)


def downgrade() -> None:
    _rekey(upgrading=False)
