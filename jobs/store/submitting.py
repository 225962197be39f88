"""State changes by intent, a submit: claimed for its POST, accepted by fal, a request adopted
from elsewhere, and a request another job holds noted."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any, cast

from sqlalchemy import insert, literal, null, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from jobs import db
from jobs.models import JobEvent, utcnow
from jobs.states import JobState
from jobs.store.core import _JOBS, _refresh_loaded, _run
from jobs.store.key_refusals import forget_key_refusals
from jobs.store.transitions import _EVENTS, _INSERT_EVENT, _UNLEASED, Fence, _move


def mark_submitting(
    session: Session, fence: Fence, *, attempt: int, api_key_id: str, lease_expires_at: datetime
) -> bool:
    """``pending``/``retry_wait`` → ``submitting``: attempt number ``attempt`` is about to be sent
    with ``api_key_id``, leased to ``fence.owner``. An earlier attempt's input and send time are
    forgotten: each attempt records them right before its POST (:func:`record_send`). Its
    ``start_timeout_at`` is kept until then (:func:`record_send` writes the new one, None too):
    a claimed resend dropped for the earlier attempt's proof (:func:`adopt_before_resend`) keeps
    that attempt's request, which was sent with it.

    Not synced on its own (:func:`jobs.db.covered`): nothing is sent before :func:`record_send`
    commits, synced, which makes this claim (and the budget it holds) durable first; lost to a
    power cut before that, the job is ``pending`` again and is claimed again."""
    with db.covered(session):
        return _move(
            session,
            fence,
            JobState.SUBMITTING,
            f"attempt {attempt}",
            attempts=attempt,
            api_key_id=api_key_id,
            submitted_input=None,
            sent_at=None,
            lease_owner=fence.owner,
            lease_expires_at=lease_expires_at,
        )


def mark_submitted(
    session: Session,
    fence: Fence,
    *,
    running: bool,
    request_id: str,
    gateway_request_id: str | None,
    status_url: str | None,
    response_url: str | None,
    cancel_url: str | None,
    submitted_at: datetime,
    next_poll_at: datetime,
) -> bool:
    """``submitting`` → ``queued`` (``running`` when fal started it at once): fal accepted the
    request as ``request_id``. From ``submit_unknown`` it is the late answer to a POST the
    reconciler had given up on: the proof that the request exists."""
    late = "late answer: " if fence.state == JobState.SUBMIT_UNKNOWN else ""
    return _move(
        session,
        fence,
        JobState.RUNNING if running else JobState.QUEUED,
        f"{late}accepted as {request_id}",
        request_id=request_id,
        gateway_request_id=gateway_request_id,
        status_url=status_url,
        response_url=response_url,
        cancel_url=cancel_url,
        submitted_at=submitted_at,
        next_attempt_at=next_poll_at,
        error=None,
        error_type=None,
        **_UNLEASED,
    )


def adopt_request(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    submitted_at: datetime,
    next_poll_at: datetime,
    proof: str = "proved by webhook",
    **fetched: Any,
) -> bool:
    """``submitting``/``submit_unknown`` → ``queued``: fal's signed webhook for this job's current
    attempt proves it accepted the POST whose answer we never stored, as ``request_id`` — or
    the journal of the process that sent it does, which had the answer but no database to
    write it to (``proof`` says which). The job keeps that request (never resent); its URLs are
    derived from the configured queue. ``fetched``: what a webhook carries of fal's result
    (:func:`adopt_late_proof`)."""
    return _move(
        session,
        fence,
        JobState.QUEUED,
        f"{proof}: accepted as {request_id}",
        request_id=request_id,
        gateway_request_id=gateway_request_id,
        status_url=None,
        response_url=None,
        cancel_url=None,
        submitted_at=submitted_at,
        next_attempt_at=next_poll_at,
        error=None,
        error_type=None,
        **_UNLEASED,
        **fetched,
    )


def note_held_request(
    session: Session,
    job_id: str,
    *,
    reason: str,
    worker: str | None,
    error: str | None = None,
    fence: Fence | None = None,
) -> bool:
    """Put on ``job_id``'s history that fal named, for one of its attempts, a request another
    job holds (:class:`~jobs.errors.RequestHeldError`; ``reason`` names the request and that
    job, never "accepted as <id>": the request is not the job's, :func:`request_known`), and
    with ``error`` say so in the job's error too (a ``submit_unknown`` job stays there: the
    error is what ``status`` shows of it). An event that moves nothing, as :func:`note_request`
    writes, no version bump; once per ``reason`` (a journal read again notes nothing more).
    ``fence``: only while the job is still where it saw it (state and version). False when
    there is no such job (or it moved on), or the note is there already."""
    locked = update(_JOBS).where(_JOBS.c.id == job_id).values(updated_at=utcnow())
    if fence is not None:
        locked = locked.where(_JOBS.c.state == fence.state, _JOBS.c.version == fence.version)
    row = _run(session, locked.returning(_JOBS.c.state, _JOBS.c.version)).first()
    if row is None:
        return False
    noted = select(JobEvent.id).where(
        JobEvent.job_id == job_id, JobEvent.from_state == JobEvent.to_state, JobEvent.reason == reason
    )
    if session.scalar(noted.limit(1)) is not None:
        return False
    if error is not None:
        _run(session, update(_JOBS).where(_JOBS.c.id == job_id).values(error=error))
        _refresh_loaded(session, job_id, {"error": error})
    event = {"job_id": job_id, "at": utcnow(), "from_state": row.state, "to_state": row.state}
    event.update(version=row.version, reason=reason, details=None, worker=worker)
    _run(session, _INSERT_EVENT, event)
    return True


#: How many jobs one statement of :func:`note_handed_on` names (SQLite's bound parameters).
_NOTE_CHUNK = 1000


def note_handed_on(
    session: Session, job_ids: Collection[str], *, reason: str, queue_owner: str, worker: str | None
) -> int:
    """Put ``reason`` on the history of each of ``job_ids`` still handed to a task not started
    yet (as :func:`jobs.store.handed_off` found it: ``submitting`` with no recorded input, or
    ``downloading`` under ``queue_owner``): an event that moves nothing, at its state and
    version (the broker lost the job's message, and it was sent again). Set-based: one
    statement per :data:`_NOTE_CHUNK` jobs. Returns how many were noted."""
    ids = sorted(job_ids)
    waiting = ((_JOBS.c.state == JobState.SUBMITTING) & _JOBS.c.submitted_input.is_(None)) | (
        (_JOBS.c.state == JobState.DOWNLOADING) & (_JOBS.c.lease_owner == queue_owner)
    )
    columns = ("job_id", "at", "from_state", "to_state", "version", "reason", "details", "worker")
    noted = 0
    for start in range(0, len(ids), _NOTE_CHUNK):
        rows = select(
            _JOBS.c.id,
            literal(utcnow(), _EVENTS.c.at.type),
            _JOBS.c.state,
            _JOBS.c.state,
            _JOBS.c.version,
            literal(reason, _EVENTS.c.reason.type),
            null(),
            literal(worker, _EVENTS.c.worker.type),
        ).where(_JOBS.c.id.in_(ids[start : start + _NOTE_CHUNK]), waiting)
        done = session.execute(insert(_EVENTS).from_select([_EVENTS.c[c] for c in columns], rows))
        noted += max(0, cast("CursorResult[Any]", done).rowcount or 0)
    return noted


def followed_with_key(session: Session, job_id: str, request_id: str, api_key_id: str) -> bool:
    """fal answered about ``request_id`` (a status, a stream's event, a result) when asked with
    the key ``api_key_id``, though the job recorded another key for it (``Job.api_key_id``: a key
    rotated within one fal account, which may ask about the old key's requests): the request is
    now that key's to follow, and counted against its caps. Nothing changes for a job that waits
    on another request now, or recorded no key (anyone's already). Whether it changed anything.

    Not a move of the job (its version stays): the request and its state are the same. Any
    refusal of it noted for a key (:func:`jobs.store.note_key_refused`) goes: fal answered."""
    forget_key_refusals(session, [job_id])
    statement = (
        update(_JOBS)
        .where(
            _JOBS.c.id == job_id,
            _JOBS.c.request_id == request_id,
            _JOBS.c.api_key_id.is_not(None),
            _JOBS.c.api_key_id != api_key_id,
        )
        .values(api_key_id=api_key_id)
    )
    result = cast(CursorResult[Any], _run(session, statement))
    if result.rowcount:
        _refresh_loaded(session, job_id, {"api_key_id": api_key_id})
    return bool(result.rowcount)
