"""Uploads are remembered per fal: ``uploads.origin`` joins the primary key.

The upload cache was keyed by the file's SHA-256 alone, so a URL from one fal's storage (a
simulator's ``http://127.0.0.1:…/files/…``) was sent to another (real fal), and, never
expiring, a URL fal's storage had dropped was sent forever. Rows stored before do not say
which fal they came from: they are dropped (the cache only saves an upload; the next job that
needs the file uploads it again). A downgrade drops the cache too: rows of several origins
would share a hash.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | Sequence[str] | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _uploads(*, with_origin: bool) -> None:
    key = ["origin", "content_sha256"] if with_origin else ["content_sha256"]
    origin = [sa.Column("origin", sa.String(255), nullable=False)] if with_origin else []
    op.create_table(
        "uploads",
        *origin,
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("provider_url", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint(*key, name=op.f("pk_uploads")),
    )


def upgrade() -> None:
    op.drop_table("uploads")
    _uploads(with_origin=True)


def downgrade() -> None:
    op.drop_table("uploads")
    _uploads(with_origin=False)
