"""``fal_accounts``: the fal account (webhook user id) each API key's deliveries are pinned to.

fal signs every account's webhooks with the same keys, so a valid signature proves only that
fal sent a delivery. The token of the ``fal_webhook`` URL binds it to one of our submits, but a
token that leaks (a reverse proxy's access log keeps query strings) let another fal account have
fal deliver "proof" for one of our jobs: its own request adopted, its video fetched, duplicate
charges counted. Each signed delivery names its account (``X-Fal-Webhook-User-Id``), and this
table pins each API key (``jobs.api_key_id``) to the account of the first delivery of a request
we recorded from that key's own submit: deliveries of any other account are refused from then on.
The pin is per key and signer (``signer``: the origin of the JWKS the delivery was verified
against, ``WANBATCH_WEBHOOK_JWKS_URL``): a ``FAL_KEY`` tried once against ``wanbatch simulator``
(its own JWKS, its ``sim-user``) is not thereby pinned against fal's real deliveries.

``webhook_deliveries.user_id`` keeps the account a delivery was signed for (NULL: stored before
this revision, applied as before), so one stored before the account was learnt and applied (or
read as proof by the submit-unknown deadline) after is checked against it too.

Revision ID: 0037
Revises: 0036
Create Date: 2026-12-23 12:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0037"
down_revision: str | Sequence[str] | None = "0036"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fal_accounts",
        sa.Column("api_key_id", sa.String(length=32), nullable=False),
        sa.Column("signer", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("request_id", sa.String(length=255), nullable=False),
        sa.Column("learnt_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("api_key_id", "signer", name=op.f("pk_fal_accounts")),
    )
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("user_id", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("user_id")
    op.drop_table("fal_accounts")
