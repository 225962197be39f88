"""Rows stored as an older wanbatch stored them, for tests of migrations and of data an older
version left: the models' own INSERTs name columns an older schema does not have yet."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text


def older_batch(
    session: Any,
    name: str,
    parent: str | None = None,
    *,
    manifest_path: str = "m.yaml",
    manifest_sha256: str = "0" * 64,
    manifest_text: str | None = None,
) -> str:
    """A batch stored by SQL on a schema older than the models (its id): the models' INSERT
    names every column of the head's ``batches`` (SQLAlchemy's unit of work sends NULL for each
    column without a default, so that INSERTs batch), some not there yet (``manifest_host``, 0050)."""
    from uuid import uuid4

    batch_id = uuid4().hex
    session.execute(
        text(
            "INSERT INTO batches (id, name, manifest_path, manifest_sha256, manifest_text, created_at, "
            "state, priority, paused_by_user, reuse_outputs, simulated, parent_batch_id) VALUES (:id, "
            ":name, :path, :sha, :manifest_text, :at, 'active', 'normal', false, false, false, :parent)"
        ),
        {
            "id": batch_id,
            "name": name,
            "path": manifest_path,
            "sha": manifest_sha256,
            "manifest_text": manifest_text,
            "at": datetime(2026, 1, 1, tzinfo=UTC),
            "parent": parent,
        },
    )
    return batch_id
