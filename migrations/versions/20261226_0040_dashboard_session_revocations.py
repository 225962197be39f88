"""``dashboard_session_revocations``: the dashboard logins ended by ``POST /logout``.

The login cookie was one fixed HMAC of the token: the same value for every login, and a logout
only asked the browser to forget it; a copy kept read and acted for ever, until the token
changed. Each login's value now carries its issue time and a random session id, signed
(``web.auth``), and is refused after 30 days; a logout puts its session id here, refused by
every ``serve`` of the database until the session would have expired anyway. Created empty:
the values of before the upgrade are refused by their shape (their browsers log in again).

Revision ID: 0040
Revises: 0039
Create Date: 2026-12-26 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0040"
down_revision: str | Sequence[str] | None = "0039"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dashboard_session_revocations",
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),  # UTCDateTime, as 0001
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_dashboard_session_revocations")),
    )


def downgrade() -> None:
    op.drop_table("dashboard_session_revocations")
