"""fal outages: a process's hold on its submits while fal cannot be reached."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, and_, delete, exists, or_, select, update
from sqlalchemy.orm import Session

from jobs.models import EVERY_BATCH, FAL_UNREACHABLE, Batch, FalHold
from jobs.states import JobState
from jobs.store.core import _JOBS, _dialect_insert
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


def live_fal_hold_owners(session: Session, *, live_since: datetime) -> list[str]:
    """The owners of the holds renewed at ``live_since`` or later (:func:`fal_holds`), whatever
    their scope: those a caller may yet tell ended (a pid of its host that no longer runs)."""
    rows = session.scalars(select(FalHold.owner).where(FalHold.seen_at >= live_since).distinct())
    return sorted(rows)


def end_fal_waits(
    session: Session,
    batch_ids: Collection[str] | None,
    *,
    now: datetime,
    longest: timedelta,
    live_since: datetime,
    ended: Collection[str] = (),
) -> int:
    """Make due at ``now`` the ``pending`` jobs (of ``batch_ids``; of every batch when None) that
    wait only for a process's hold on fal: ``error_type`` :data:`FAL_UNREACHABLE`, due within
    ``longest`` (its longest probe pause: a later one waits for something else, such as its
    schedule's next window), and no hold renewed since ``live_since`` covers their batch — a
    run's of it, or a distributed worker's (every batch but a ``--simulate`` one), ``ended``
    owners' left out. How many.

    The backoff is the holding process's, stored on the job only so that no other process takes
    it meanwhile: once no live hold covers it, it holds the job for nothing.

    The hold's words on such a job (``error`` "held back: fal unreachable …") go with it, on the
    jobs made due and on those already due or due later for something else (a schedule's next
    window): a give-back that names no error of its own (the submit rate, the schedule) kept
    them, and ``status`` said fal was unreachable until the job was sent."""
    hold = FalHold.__table__.alias("holds")
    # Not an EXISTS on batches: nested in ``covered``, it correlated to nothing (``FROM batches,
    # jobs``), so that one simulated batch anywhere made every ``*`` hold cover nothing.
    simulated = _JOBS.c.batch_id.in_(select(Batch.id).where(Batch.simulated.is_(True)))
    covered = exists().where(
        hold.c.seen_at >= live_since,
        hold.c.owner.not_in(sorted(ended)),
        or_(hold.c.scope == _JOBS.c.batch_id, and_(hold.c.scope == EVERY_BATCH, ~simulated)),
    )
    held = [_JOBS.c.state == JobState.PENDING, _JOBS.c.error_type == FAL_UNREACHABLE, ~covered]
    if batch_ids is not None:
        held.append(_JOBS.c.batch_id.in_(sorted(batch_ids)))
    no_error: dict[str, Any] = {"error": None, "error_type": None}
    freed = (
        update(_JOBS)
        .where(*held, _JOBS.c.next_attempt_at > now, _JOBS.c.next_attempt_at <= now + longest)
        .values(next_attempt_at=now, **no_error)
        .execution_options(preserve_rowcount=True)
    )
    count = int(cast(CursorResult[Any], session.execute(freed)).rowcount)
    session.execute(update(_JOBS).where(*held).values(**no_error))  # the rest: only the words go
    return count
