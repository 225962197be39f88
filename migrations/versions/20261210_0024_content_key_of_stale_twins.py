"""``jobs.content_key``: the key a job's input gives now, for the twins 0022 left on their old key.

Migration 0022 keyed stored data URIs by their decoded bytes, but a job whose new key another job
of its batch already held (its twin: the same image under another media-type spelling, or as a
file, stored as two jobs by earlier versions) kept its old text key, since a batch holds each key
once. ``reuse_outputs`` looks outputs up by key, so such a twin was paid for again: unsent, it did
not find the video of a twin that succeeded, nor a twin left on its old key the video it held.
Each such job now records in ``content_key`` the key its input gives (the one its twin holds),
and the lookup goes by either; every other job holds None.

Only a job whose stored key is exactly the former rule's for its stored input (as 0022 checks:
files standing in by the SHA-256 their ``source_files`` recorded, the disk never read) and differs
from the new one gets it. A downgrade drops the column.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-10 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0024"
down_revision: str | Sequence[str] | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_JOBS = sa.table(
    "jobs",
    sa.column("id", sa.String),
    sa.column("endpoint", sa.String),
    sa.column("job_key", sa.String),
    sa.column("content_key", sa.String),
    sa.column("input", _JSON),
    sa.column("source_files", _JSON),
)
#: Jobs read at a time (a data URI may be several MB).
_CHUNK = 200


def _stale(row: Any) -> str | None:
    """The new key of a job left on the former rule's key (data URIs by text), else None."""
    from jobs.endpoints import get_endpoint, known_endpoint_ids
    from jobs.manifest.keys import key_of, keyed_input
    from jobs.media import MediaKind, classify

    if row.endpoint not in known_endpoint_ids() or not isinstance(row.input, dict):
        return None
    spec = get_endpoint(row.endpoint)
    recorded = row.source_files if isinstance(row.source_files, dict) else {}
    digests: dict[str, str | None] = {}
    uris: dict[str, str] = {}
    for fld in spec.media_fields:
        value = row.input.get(fld.name)
        if not isinstance(value, str) or "\0" in value:
            continue
        form = classify(value)
        if form is MediaKind.DATA_URI:
            uris[fld.name] = value
        elif form is MediaKind.PATH:
            source = recorded.get(fld.name)
            sha = source.get("sha256") if isinstance(source, dict) else None
            if not isinstance(sha, str):
                return None  # its key cannot be reproduced without reading the disk
            digests[value] = sha
    if not uris:
        return None
    new = keyed_input(spec, row.input, digests)
    # Numbers as written: the rule of both keys until 0034 keyed numbers by their value.
    old = key_of(spec.id, {**new, **uris}, numbers_as_written=True)
    now = key_of(spec.id, new, numbers_as_written=True)
    return now if row.job_key == old != now else None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("content_key", sa.String(length=64), nullable=True))
        batch.create_index("ix_jobs_content_key", ["content_key"], unique=False)
    bind = op.get_bind()
    lowered = sa.func.lower(sa.cast(_JOBS.c.input, sa.Text))
    ids = list(
        bind.execute(sa.select(_JOBS.c.id).where(lowered.like("%data:%")).order_by(_JOBS.c.id)).scalars()
    )
    for start in range(0, len(ids), _CHUNK):
        rows = bind.execute(
            sa.select(
                _JOBS.c.id, _JOBS.c.endpoint, _JOBS.c.job_key, _JOBS.c.input, _JOBS.c.source_files
            ).where(_JOBS.c.id.in_(ids[start : start + _CHUNK]))
        ).all()
        for row in rows:
            key = _stale(row)
            if key is not None:
                bind.execute(_JOBS.update().where(_JOBS.c.id == row.id).values(content_key=key))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_content_key")
        batch.drop_column("content_key")
