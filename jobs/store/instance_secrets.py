"""The database's secrets, made once by whichever process asks first."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.models import InstanceSecret, utcnow
from jobs.store.core import _dialect_insert


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
