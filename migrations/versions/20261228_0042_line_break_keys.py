"""Stored jobs whose input text holds ``\\r\\n`` or a lone ``\\r`` are keyed with ``\\n``.

An ``items_from`` CSV with CRLF line endings (saved by Excel, checked out with git's
``autocrlf``) kept ``\\r\\n`` inside a quoted multi-line cell: ``two\\r\\nlines`` was another prompt
than the same file's ``two\\nlines`` with LF endings, another job key, and a job sent and billed
again. A CSV cell's line breaks are now read as ``\\n``, and a job key holds every text's line
breaks as ``\\n`` (:func:`jobs.manifest.keys.lf`). Without this migration a job stored from a CRLF
file would hold a key its manifest no longer gives: submitting it again would leave it out (a
never-sent one dropped) and add the same item as a new job, sent and paid for again, and
``reuse_outputs`` would never find its video.

As 0034: only a job whose stored key is exactly the former rule's for its stored input gets the
new one (files standing in by the SHA-256 their ``source_files`` recorded, the disk never read);
a key that cannot be reproduced is left as it is. Only inputs whose stored JSON text holds ``\\r``
are read at all. A new key another job of the same batch holds already (the CRLF and the LF file
stored as two jobs before) is left to that job, a succeeded one first: this one records it in
``content_key``, so ``reuse_outputs`` finds either's video by it. A ``content_key`` of the former
rule takes the new one. The input itself (what was, or will be, sent) is not changed. A downgrade
does the reverse, under the same checks.

Revision ID: 0042
Revises: 0041
Create Date: 2026-12-27 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0042"
down_revision: str | Sequence[str] | None = "0041"
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
    """The job's key under the former rule (line breaks as written) and under the new one (as
    ``\\n``); None when its endpoint is unknown or its input no object."""
    from jobs.endpoints import get_endpoint, known_endpoint_ids
    from jobs.manifest.keys import key_of, stored_keyed_input

    if row.endpoint not in known_endpoint_ids() or not isinstance(row.input, dict):
        return None
    spec = get_endpoint(row.endpoint)
    sources = row.source_files if isinstance(row.source_files, dict) else None
    keyed = stored_keyed_input(spec, row.input, sources)
    return key_of(spec.id, keyed, breaks_as_written=True), key_of(spec.id, keyed)


def _rekey(upgrading: bool) -> None:
    bind = op.get_bind()
    # JSON writes a carriage return as the escape \r (both databases' stored text).
    returns = sa.cast(_JOBS.c.input, sa.Text).contains("\\r", autoescape=True)
    # Of two jobs of a batch that now share a key, a succeeded one takes it first (as 0034).
    done = sa.case((_JOBS.c.state == "succeeded", 0), else_=1)
    order = (done, _JOBS.c.item_index, _JOBS.c.variant, _JOBS.c.id)
    ids = list(bind.execute(sa.select(_JOBS.c.id).where(returns).order_by(*order)).scalars())
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
                # A twin's content key moves with the rule; one this migration set (its job key
                # is the former rule's) is dropped on the way down.
                values["content_key"] = None if not upgrading and row.job_key == old else becomes
            if values:
                bind.execute(_JOBS.update().where(_JOBS.c.id == row.id).values(**values))


def upgrade() -> None:
    _rekey(upgrading=True)


def downgrade() -> None:
    _rekey(upgrading=False)
