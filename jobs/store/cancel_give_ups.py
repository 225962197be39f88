"""Cancels given up at fal (:mod:`worker.steps.cancel_tries`), on the job's history.

A process gives a request's cancel up after :data:`~worker.steps.cancel_tries.CANCEL_ATTEMPTS`
failures: the job stays ``queued`` or ``running``, since fal may still run and bill it. That was
known only to the process that gave up, so once an embedded ``cancel`` (or ``run``) had ended,
``status`` showed a cancelled batch and nothing said which of its requests fal never took a
cancel for. Each give-up is now a note on the job's history (an event that moves nothing, as
:func:`jobs.store.note_request` writes), naming the request, the tries and the last failure
(key-free: fal's errors are scrubbed by the client). A note holds while the job still waits at
fal on that very request (``queued`` or ``running``): a cancel fal takes later (``cancelling``),
fal's end of the request, or a new attempt leaves it behind as history, never read again — so
nothing has to be deleted. ``status`` reads the notes that hold (:func:`uncancelled_requests`);
the next ``cancel`` (or ``run``) of the batch asks fal again, as a new process always did."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, literal, select
from sqlalchemy.orm import Session

from jobs.models import Job, JobEvent
from jobs.states import JobState
from jobs.store.core import _JOBS
from jobs.store.transitions import _EVENTS

#: The words a give-up's note begins with, and the key of its details naming the request.
CANCEL_GIVEN_UP_REASON = "cancel given up at fal"
CANCEL_GIVEN_UP = "cancel_given_up"

#: The states in which a job whose cancel was given up waits on its request at fal.
GIVEN_UP_STATES = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True, slots=True)
class Uncancelled:
    """A job of a batch whose request ``request_id`` a process could not cancel at fal: the last
    failure (``error``), how many tries that process made, and when it gave up."""

    job_id: str
    request_id: str
    error: str
    tries: int
    at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "request_id": self.request_id,
            "error": self.error,
            "tries": self.tries,
            "given_up_at": self.at.isoformat(),
        }


def note_cancel_given_up(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    error: str,
    tries: int,
    worker: str | None,
    now: datetime,
) -> bool:
    """Put on ``job_id``'s history that its cancel of ``request_id`` was given up after ``tries``
    failures, the last ``error``: a note at the job's state and version, written only while the
    job still waits at fal on that very request (one statement). Whether it was written."""
    reason = f"{CANCEL_GIVEN_UP_REASON}: request {request_id} ({tries} tries)"
    details = {CANCEL_GIVEN_UP: request_id, "tries": tries, "error": error}
    rows = select(
        _JOBS.c.id,
        literal(now, _EVENTS.c.at.type),
        _JOBS.c.state,
        _JOBS.c.state,
        _JOBS.c.version,
        literal(reason, _EVENTS.c.reason.type),
        literal(details, _EVENTS.c.details.type),
        literal(worker, _EVENTS.c.worker.type),
    ).where(
        _JOBS.c.id == job_id,
        _JOBS.c.request_id == request_id,
        _JOBS.c.state.in_(list(GIVEN_UP_STATES)),
    )
    columns = ("job_id", "at", "from_state", "to_state", "version", "reason", "details", "worker")
    # RETURNING, not the rowcount: psycopg's for an INSERT … SELECT of no row is not 0.
    noted = insert(_EVENTS).from_select([_EVENTS.c[c] for c in columns], rows).returning(_EVENTS.c.id)
    return session.execute(noted).first() is not None


def uncancelled_requests(session: Session, batch_ids: Collection[str]) -> dict[str, list[Uncancelled]]:
    """The jobs of each of ``batch_ids`` still waiting at fal on a request whose cancel a process
    gave up (:func:`note_cancel_given_up`), the latest give-up of each, oldest first; a batch
    with none is left out. Only jobs ``queued`` or ``running`` are read (their notes by the
    events' job index): ask it of cancelled batches, whose jobs those are only while cancelling."""
    if not batch_ids:
        return {}
    query = (
        select(Job.batch_id, Job.id, Job.request_id, JobEvent.at, JobEvent.details)
        .join(JobEvent, JobEvent.job_id == Job.id)
        .where(
            Job.batch_id.in_(sorted(batch_ids)),
            Job.state.in_(list(GIVEN_UP_STATES)),
            Job.request_id.is_not(None),
            JobEvent.from_state == JobEvent.to_state,
            JobEvent.reason.startswith(CANCEL_GIVEN_UP_REASON, autoescape=True),
        )
        .order_by(JobEvent.id)
    )
    latest: dict[str, tuple[str, Uncancelled]] = {}
    for batch_id, job_id, request_id, at, details in session.execute(query):
        if not isinstance(details, dict) or details.get(CANCEL_GIVEN_UP) != request_id:
            continue  # an earlier request's: that one has ended
        tries = details.get("tries")
        found = Uncancelled(
            job_id, request_id, str(details.get("error") or ""), tries if isinstance(tries, int) else 0, at
        )
        latest.pop(job_id, None)  # the latest give-up, in its place in the order
        latest[job_id] = (str(batch_id), found)
    by_batch: dict[str, list[Uncancelled]] = {}
    for batch_id, found in latest.values():
        by_batch.setdefault(batch_id, []).append(found)
    return by_batch
