"""fal's "not found" (or refusal) of a request sent with another API key, per job and asking key
(:class:`~jobs.models.KeyRefusal`, :mod:`worker.steps.other_key`): recorded where a poll, a
download or a cancel got it, read by whoever decides what to do with such a job — a ``run``
watching (embedded or the workers), ``cancel``, ``status``, ``cancel --abandon-other-key``.
A job's marks go when fal answers about it (:func:`forget_key_refusals`) and when it leaves
:data:`REFUSABLE_STATES` (:func:`jobs.store.transition` deletes them with the move)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, and_, delete, select
from sqlalchemy.orm import Session

from jobs.models import Job, KeyRefusal
from jobs.states import JobState
from jobs.store.core import _dialect_insert

#: The states in which a job waits on what fal says of its request (status, result, cancel).
REFUSABLE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING, JobState.DOWNLOADING)


@dataclass(frozen=True, slots=True)
class Refused:
    """A job whose request ``request_id``, sent with the key ``sent_with``, fal refused to the
    key ``key_id`` (and the job still waits on that request)."""

    job_id: str
    request_id: str
    sent_with: str
    key_id: str


def note_key_refused(
    session: Session, job_id: str, request_id: str, *, sent_with: str, key_id: str, now: datetime
) -> bool:
    """fal answered "not found" (or refused) about ``job_id``'s ``request_id``, recorded as sent
    with ``sent_with``, when asked with ``key_id``. Whether this is new (no mark of that request
    and sender for that key yet): the first refusal is the one worth a warning."""
    request_id = request_id[:255]
    found = session.execute(
        select(KeyRefusal.request_id, KeyRefusal.sent_with).where(
            KeyRefusal.job_id == job_id, KeyRefusal.key_id == key_id
        )
    ).first()
    if found is not None and (found.request_id, found.sent_with) == (request_id, sent_with):
        return False
    stmt = _dialect_insert(session.get_bind().dialect.name, KeyRefusal).values(
        job_id=job_id, key_id=key_id, request_id=request_id, sent_with=sent_with, refused_at=now
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "key_id"],
            set_={
                "request_id": stmt.excluded.request_id,
                "sent_with": stmt.excluded.sent_with,
                "refused_at": now,
            },
        )
    )
    return True


def forget_key_refusals(session: Session, job_ids: Collection[str]) -> None:
    """fal answered about these jobs' requests (or they were written off): their marks go."""
    for job_id in sorted(job_ids):  # in key order: two writers never deadlock
        session.execute(delete(KeyRefusal).where(KeyRefusal.job_id == job_id))


def holds() -> ColumnElement[bool]:
    """The join condition under which a mark still holds: its job waits on that very request,
    recorded as sent with that very key, which is not the key fal refused it to."""
    return and_(
        KeyRefusal.job_id == Job.id,
        KeyRefusal.request_id == Job.request_id,
        KeyRefusal.sent_with == Job.api_key_id,
        KeyRefusal.key_id != Job.api_key_id,
    )


def refused_requests(session: Session, batch_id: str, *, key_id: str | None) -> list[Refused]:
    """The jobs of batch ``batch_id`` still waiting on a request fal refused to ``key_id`` (None:
    to any key; the processes that ask, distributed workers, may have another key than the
    caller, or the caller none), oldest refusal first, one per job."""
    query = (
        select(KeyRefusal.job_id, KeyRefusal.request_id, KeyRefusal.sent_with, KeyRefusal.key_id)
        .join(Job, holds())
        .where(Job.batch_id == batch_id, Job.state.in_(list(REFUSABLE_STATES)))
        .order_by(KeyRefusal.refused_at, KeyRefusal.job_id)
    )
    if key_id is not None:
        query = query.where(KeyRefusal.key_id == key_id)
    found: dict[str, Refused] = {}
    for row in session.execute(query):
        found.setdefault(row.job_id, Refused(row.job_id, row.request_id, row.sent_with, row.key_id))
    return list(found.values())
