"""The database's webhook secret is made with the database, not on first use.

The secret that keys every ``fal_webhook`` URL's token (``instance_secrets``, name ``webhook``,
0016) was made lazily, the first time a process minted or checked a webhook URL. A backup taken
before then lacked it: restored, the database made a new secret, every late delivery of the
submits made since the backup was refused 403, and their proof was lost — the next run sent and
paid for those jobs again. This makes the secret now, if the database has none, so every backup
from here on holds it (a new database gets it as it is created, ``jobs.db._create_from_models``).
A secret already made is left as it is: the tokens of requests at fal are keyed by it.

A downgrade keeps the secret: the older version uses it as its own (made on first use), and
dropping it would refuse every delivery of a request at fal.

Revision ID: 0046
Revises: 0045
Create Date: 2027-01-01 12:00:00
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0046"
down_revision: str | Sequence[str] | None = "0045"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The secret's name (``jobs.store.WEBHOOK_SECRET``).
WEBHOOK_SECRET = "webhook"  # noqa: S105 - the secret's name, not a secret


def upgrade() -> None:
    conn = op.get_bind()
    table = sa.table(
        "instance_secrets",
        sa.column("name", sa.String),
        sa.column("value", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    if conn.execute(sa.select(table.c.name).where(table.c.name == WEBHOOK_SECRET)).first() is not None:
        return
    now = datetime.now(UTC)
    # SQLite keeps UTC text without an offset (jobs.models.UTCDateTime), PostgreSQL an aware time.
    created_at = now.replace(tzinfo=None) if conn.dialect.name == "sqlite" else now
    made = {"name": WEBHOOK_SECRET, "value": secrets.token_hex(32), "created_at": created_at}
    conn.execute(table.insert().values(**made))


def downgrade() -> None:
    """Nothing to undo (see the module's text)."""
