"""Stored jobs whose image or audio went as a data URI are keyed by its decoded bytes, as files are.

Until now a data URI was keyed by its text, a local file by its bytes' SHA-256: a replay that sent
inline the image the original run read from a file (or the same bytes with another base64 or media
type spelling) was another job, so ``reuse_outputs`` paid for it again and ``diff`` could not pair
it. The key now sees ``sha256:<decoded bytes>`` for both (:func:`jobs.manifest.keys.keyed_input`).
Without this migration the keys stored before would no longer be the ones a manifest gives: the
same manifest submitted again to its batch would add its data-URI jobs a second time (the batch is
idempotent by key), and ``reuse_outputs`` would never find them.

Each stored job with a data URI in a media field is rekeyed, but only when its stored key is
exactly the one the former rule gives for its stored input (files standing in by the SHA-256 its
``source_files`` recorded; the disk is never read): a key that cannot be reproduced is left as it
is. A new key another job of the same batch already holds (two spellings of one image, or the file
and the URI, both stored in one batch before) is left as it is too: the batch's jobs stay
distinct. A succeeded twin takes the new key first (``reuse_outputs`` looks its output up by it),
then the first in manifest order (item, variant), as the manifest, which now collapses them,
keeps its first: whichever twin holds it, the manifest's job resolves to that one key, so the
batch stays idempotent. (Migration 0024 records the new key of the twins left behind.) A
downgrade does the reverse, under the same checks.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-08 12:00:00
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0022"
down_revision: str | Sequence[str] | None = "0021"
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
    sa.column("input", _JSON),
    sa.column("source_files", _JSON),
)
#: Jobs read at a time (a data URI may be several MB).
_CHUNK = 200


def _keys(row: Any) -> tuple[str, str] | None:
    """The job's key under the former rule (data URIs by text) and under the new one (by their
    decoded bytes); None when it has no data URI in a media field, or its endpoint is unknown."""
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
    old = {**new, **uris}
    # Numbers as written: the rule of both keys until 0034 keyed numbers by their value.
    return key_of(spec.id, old, numbers_as_written=True), key_of(spec.id, new, numbers_as_written=True)


def _rekey(pick: Callable[[tuple[str, str]], tuple[str, str]]) -> None:
    """Each job with a data URI whose stored key is ``pick(keys)[0]`` gets ``pick(keys)[1]``,
    unless another job of its batch holds that key already."""
    bind = op.get_bind()
    lowered = sa.func.lower(sa.cast(_JOBS.c.input, sa.Text))
    # Of two jobs of a batch that now share a key, a succeeded one takes it (reuse_outputs finds
    # its output by it: a failed twin holding it hid the video), then the first in manifest
    # order, as the manifest, which collapses them, keeps its first.
    done = sa.case((_JOBS.c.state == "succeeded", 0), else_=1)
    order = (done, _JOBS.c.item_index, _JOBS.c.variant, _JOBS.c.id)
    ids = list(bind.execute(sa.select(_JOBS.c.id).where(lowered.like("%data:%")).order_by(*order)).scalars())
    for start in range(0, len(ids), _CHUNK):
        rows = bind.execute(
            sa.select(
                _JOBS.c.id,
                _JOBS.c.batch_id,
                _JOBS.c.endpoint,
                _JOBS.c.job_key,
                _JOBS.c.input,
                _JOBS.c.source_files,
            )
            .where(_JOBS.c.id.in_(ids[start : start + _CHUNK]))
            .order_by(*order)
        ).all()
        for row in rows:
            keys = _keys(row)
            if keys is None:
                continue
            was, becomes = pick(keys)
            if row.job_key != was or was == becomes:
                continue
            taken = bind.execute(
                sa.select(_JOBS.c.id).where(_JOBS.c.batch_id == row.batch_id, _JOBS.c.job_key == becomes)
            ).first()
            if taken is None:
                bind.execute(_JOBS.update().where(_JOBS.c.id == row.id).values(job_key=becomes))


def upgrade() -> None:
    _rekey(lambda keys: keys)


def downgrade() -> None:
    _rekey(lambda keys: (keys[1], keys[0]))
