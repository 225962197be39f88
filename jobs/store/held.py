"""Accepted submissions a live process holds in its journal, their record refused: marked here
for every other process (:class:`~jobs.models.HeldSubmission`, :mod:`worker.steps.held`)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from jobs.models import HeldSubmission
from jobs.store.core import _dialect_insert
from jobs.store.heartbeats import HEARTBEAT_KEPT


def hold_submissions(session: Session, owner: str, held: Mapping[str, str], *, now: datetime) -> None:
    """``owner`` (a process, ``host:pid:``) holds the accepted submissions ``held`` (job id →
    request id) that the database would not record: marked, or renewed (``now`` as their
    ``seen_at``). Marks left for :data:`~jobs.store.heartbeats.HEARTBEAT_KEPT` (a process that
    died holding) go."""
    session.execute(delete(HeldSubmission).where(HeldSubmission.seen_at < now - HEARTBEAT_KEPT))
    dialect = session.get_bind().dialect.name
    for job_id in sorted(held):  # in key order: two writers never deadlock
        stmt = _dialect_insert(dialect, HeldSubmission).values(
            job_id=job_id, owner=owner, request_id=held[job_id][:255], seen_at=now
        )
        session.execute(
            stmt.on_conflict_do_update(
                index_elements=["job_id"],
                set_={"owner": stmt.excluded.owner, "request_id": stmt.excluded.request_id, "seen_at": now},
            )
        )


def release_held(session: Session, held: Mapping[str, str]) -> None:
    """The submissions ``held`` (job id → request id) are recorded (or no longer held by this
    process): their marks go, whoever wrote them. A mark naming another request of the job (a
    later attempt's, held by another process) stays: it still holds that job."""
    for job_id in sorted(held):  # in key order, as hold_submissions
        session.execute(
            delete(HeldSubmission).where(
                HeldSubmission.job_id == job_id, HeldSubmission.request_id == held[job_id][:255]
            )
        )


def held_job_ids(session: Session, *, live_since: datetime) -> set[str]:
    """The jobs whose accepted submission a process holds, its mark renewed at ``live_since`` or
    later: no reconciler calls their outcome unknown, nor sends them again. An older mark is a
    holder's that is gone: it holds nothing."""
    rows = session.scalars(select(HeldSubmission.job_id).where(HeldSubmission.seen_at >= live_since))
    return {str(job_id) for job_id in rows}
