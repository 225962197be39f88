"""The dashboard logins ended by a logout (:class:`~jobs.models.DashboardSessionRevocation`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs.models import DashboardSessionRevocation
from jobs.store.core import _dialect_insert


def revoke_dashboard_session(
    session: Session, session_id: str, *, expires_at: datetime, now: datetime
) -> None:
    """Refuse the dashboard session ``session_id`` from now on, in every ``serve`` of this
    database, until ``expires_at`` (when its age refuses it anyway). The rows of sessions past
    their age go first: the table holds only what a cookie could still be shown with. A second
    logout of the same session (a double click, two tabs) does nothing."""
    session.execute(delete(DashboardSessionRevocation).where(DashboardSessionRevocation.expires_at <= now))
    dialect = session.get_bind().dialect.name
    stmt = _dialect_insert(dialect, DashboardSessionRevocation).values(
        session_id=session_id, expires_at=expires_at, revoked_at=now
    )
    session.execute(stmt.on_conflict_do_nothing(index_elements=["session_id"]))


def dashboard_session_revoked(session: Session, session_id: str) -> bool:
    """Whether a logout ended the dashboard session ``session_id``."""
    found = select(DashboardSessionRevocation.session_id).where(
        DashboardSessionRevocation.session_id == session_id
    )
    return session.execute(found).first() is not None
