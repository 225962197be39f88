"""fal outages: a process's hold on its submits while fal cannot be reached."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs.models import FalHold
from jobs.store.core import _dialect_insert
from jobs.store.heartbeats import HEARTBEAT_KEPT


@dataclass(frozen=True, slots=True)
class FalHoldRow:
    """One process's hold on its submits while fal cannot be reached (:class:`~jobs.models.FalHold`)."""

    owner: str
    scope: str
    since: datetime
    next_probe_at: datetime
    pause_seconds: float
    error: str
    seen_at: datetime


def hold_fal(
    session: Session,
    owner: str,
    scopes: Collection[str],
    *,
    since: datetime,
    next_probe_at: datetime,
    pause_seconds: float,
    error: str,
    now: datetime,
) -> None:
    """``owner`` (a process, ``host:pid:``) holds its submits of ``scopes`` (batch ids, or
    :data:`~jobs.models.EVERY_BATCH`) because fal cannot be reached from it since ``since``:
    recorded, or renewed (``now`` as its ``seen_at``). Rows left for
    :data:`HEARTBEAT_KEPT` (a process that died holding) go."""
    session.execute(delete(FalHold).where(FalHold.seen_at < now - HEARTBEAT_KEPT))
    dialect = session.get_bind().dialect.name
    values = {
        "since": since,
        "next_probe_at": next_probe_at,
        "pause_seconds": float(pause_seconds),
        "error": error[:255],
        "seen_at": now,
    }
    for scope in sorted(scopes):  # in key order, as heartbeats: two writers never deadlock
        stmt = _dialect_insert(dialect, FalHold).values(owner=owner, scope=scope, **values)
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["owner", "scope"], set_={k: getattr(stmt.excluded, k) for k in values}
            )
        )


def release_fal_hold(session: Session, owner: str, scopes: Collection[str]) -> None:
    """fal answers ``owner`` again (or the process stops): its hold on ``scopes`` is over."""
    session.execute(delete(FalHold).where(FalHold.owner == owner, FalHold.scope.in_(list(scopes))))


def fal_holds(session: Session, scopes: Collection[str], *, live_since: datetime) -> list[FalHoldRow]:
    """The holds on the submits of ``scopes`` renewed at ``live_since`` or later (older rows are
    a process's that died holding: they say nothing), the longest-standing first."""
    rows = session.execute(
        select(
            FalHold.owner,
            FalHold.scope,
            FalHold.since,
            FalHold.next_probe_at,
            FalHold.pause_seconds,
            FalHold.error,
            FalHold.seen_at,
        )
        .where(FalHold.scope.in_(list(scopes)), FalHold.seen_at >= live_since)
        .order_by(FalHold.since, FalHold.owner, FalHold.scope)
    )
    return [FalHoldRow(*row) for row in rows]
