"""Uploads: files put on fal's storage, reused while fal keeps them (:data:`UPLOAD_REUSE`)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs.models import Upload, utcnow
from jobs.store.core import _dialect_insert

#: How long an upload is reused: fal documents its storage's files as kept "for at least 7
#: days by default" (https://docs.fal.ai/faq), configurable per upload, and its newer retention
#: page promises no fixed period. A day stays well inside that, and an upload costs nothing.
UPLOAD_REUSE = timedelta(hours=24)


def record_upload(
    session: Session,
    *,
    origin: str,
    content_sha256: str,
    provider_url: str,
    size_bytes: int,
    content_type: str,
    expires_at: datetime | None = None,
    now: datetime | None = None,
) -> None:
    """Remember that content with this hash now lives at ``provider_url`` in the storage of the
    fal at ``origin`` (replaces an older upload there), until ``expires_at`` (default: ``now`` +
    :data:`UPLOAD_REUSE`). Uploads already expired are forgotten."""
    now = now or utcnow()
    session.execute(delete(Upload).where(Upload.expires_at <= now))
    dialect = session.get_bind().dialect.name
    values = {
        "origin": origin,
        "content_sha256": content_sha256,
        "provider_url": provider_url,
        "size_bytes": size_bytes,
        "content_type": content_type,
        "created_at": now,
        "expires_at": expires_at if expires_at is not None else now + UPLOAD_REUSE,
    }
    stmt = _dialect_insert(dialect, Upload).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=["origin", "content_sha256"],
        set_={key: stmt.excluded[key] for key in values if key not in ("origin", "content_sha256")},
    )
    session.execute(stmt)


def find_upload(
    session: Session, origin: str, content_sha256: str, *, now: datetime | None = None
) -> Upload | None:
    """The still-valid upload of this content to the fal at ``origin``, or ``None`` (never
    uploaded there, or expired by ``now``; a row without an expiry is not trusted)."""
    now = now or utcnow()
    return session.scalar(
        select(Upload)
        .where(Upload.origin == origin, Upload.content_sha256 == content_sha256)
        .where(Upload.expires_at > now)
        .execution_options(populate_existing=True)
    )


def forget_uploads(session: Session, provider_urls: Collection[str]) -> int:
    """Forget the uploads stored at any of ``provider_urls`` (fal could no longer download
    them): the next job that needs the file uploads it again. Returns how many were forgotten."""
    if not provider_urls:
        return 0
    result = session.execute(delete(Upload).where(Upload.provider_url.in_(list(provider_urls))))
    return int(getattr(result, "rowcount", 0) or 0)
