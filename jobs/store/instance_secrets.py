"""The database's secrets, made once by whichever process asks first (the webhook secret also
when the database is created or upgraded: :data:`WEBHOOK_SECRET`)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import InstanceSecret, utcnow
from jobs.store.core import _dialect_insert

#: The :class:`~jobs.models.InstanceSecret` that keys the webhook URLs' tokens
#: (``worker.steps.webhooks.binding_token``). Made when the database is created
#: (``jobs.db._create_from_models``) or upgraded (migration 0046), so that every backup of it
#: holds the secret its webhook tokens were minted under; a database restored from a backup that
#: lacked it would mint another, and refuse every late delivery of the submits made before.
WEBHOOK_SECRET = "webhook"  # noqa: S105 - the secret's name, not a secret


def new_secret_value() -> str:
    """A new random secret as stored: 32 random bytes in hex."""
    return secrets.token_hex(32)


def instance_secret(session: Session, name: str, make: Callable[[], str]) -> str:
    """The database's secret ``name`` (:class:`~jobs.models.InstanceSecret`), made by ``make`` and
    stored the first time it is asked for. Two processes asking at once agree: the insert of
    the second one does nothing, and both read the row that won. A secret already made is only
    read: a process whose database role may not write (a read-only ``serve``) still gets it."""
    made = instance_secret_if_made(session, name)
    if made is not None:
        return made
    dialect = session.get_bind().dialect.name
    stmt = _dialect_insert(dialect, InstanceSecret).values(name=name, value=make(), created_at=utcnow())
    session.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
    return str(session.execute(select(InstanceSecret.value).where(InstanceSecret.name == name)).scalar_one())


def instance_secret_if_made(session: Session, name: str) -> str | None:
    """The database's secret ``name`` if some process made it (None: not yet), read only: what
    ``wanbatch doctor``, which changes nothing, may ask."""
    return session.execute(
        select(InstanceSecret.value).where(InstanceSecret.name == name)
    ).scalar_one_or_none()
