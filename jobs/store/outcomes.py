"""State changes by intent, what happened to a sent job: its submit's outcome unknown, retried
later, failed, given back, running, completed, succeeded (or reusing another job's output, or
taking a staged video), cancelled, and its result recorded."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import exists, func, literal, literal_column, or_, select
from sqlalchemy.orm import Session, aliased

from jobs import db
from jobs.models import ADOPTED_REASON as ADOPTED_REASON
from jobs.models import Batch, Job, JobEvent, JobRecord, utcnow
from jobs.states import JobState
from jobs.store.core import (
    _JOBS,
    _NEXT_ATTEMPT,
    _NOT_COUNTED,
    _OUTSTANDING_START_TIMEOUT,
    _POSSIBLY_BILLED_MORE,
    _RESEND_UNSENT,
)
from jobs.store.transitions import (
    _FORGET_REQUEST,
    _FORGET_URLS,
    _UNLEASED,
    _ZERO_IF_NEVER_SENT,
    _ZERO_UNITS_IF_NEVER_SENT,
    Fence,
    _move,
    incremented,
    update_job_fields,
)


def mark_submit_unknown(session: Session, fence: Fence, *, why: str, due_at: datetime) -> bool:
    """``submitting`` → ``submit_unknown``: the POST may have been accepted (and billed), and
    nothing says whether it was. Due at ``due_at`` for the policy, unless proof comes first.

    The job was sent: ``submitted_at`` becomes the POST's send time (:func:`transition`). Its
    request id is unknown, so an earlier attempt's is not shown as if it were this one's (the
    error says the outcome is unknown; the history keeps the earlier ids, and a late answer or
    a webhook records this one's)."""
    return _move(
        session,
        fence,
        JobState.SUBMIT_UNKNOWN,
        f"submit outcome unknown: {why}",
        error=f"submission outcome unknown: {why}",
        error_type="submit_unknown",
        next_attempt_at=due_at,
        **_FORGET_REQUEST,
        **_UNLEASED,
    )


def retry_later(
    session: Session,
    fence: Fence,
    *,
    reason: str,
    at: datetime | None = None,
    possible_duplicate: bool = False,
    **fields: Any,
) -> bool:
    """→ ``retry_wait``: submit again at ``at`` (at once when None), as a new attempt.

    The new attempt is a new request, so its count of malformed status answers and failed
    result calls (``download_attempts``) starts afresh. ``possible_duplicate``: the attempt it
    replaces may have been accepted and billed (an ambiguous submit), so the next attempt is
    marked as its resend (``resend_attempt``). It is counted in ``possible_duplicate_charges``
    only once its POST is recorded as sent (:func:`record_send`): a job cancelled, failed or
    past its deadline before that never sent anything again. ``fields`` (the error, the cost
    so far) are written too.
    """
    extra: dict[str, Any] = {"download_attempts": 0, **fields}
    if possible_duplicate:
        extra["resend_attempt"] = _NEXT_ATTEMPT
    return _move(session, fence, JobState.RETRY_WAIT, reason, next_attempt_at=at, **_UNLEASED, **extra)


def fail_job(
    session: Session,
    fence: Fence,
    *,
    error: str,
    error_type: str | None,
    reason: str | None = None,
    **fields: Any,
) -> bool:
    """→ ``failed``, for good: ``error`` says why (and is the event's reason unless ``reason`` is
    given); ``fields`` record what else is known, such as the attempt's billed cost."""
    return _move(
        session,
        fence,
        JobState.FAILED,
        error if reason is None else reason,
        error=error,
        error_type=error_type,
        **fields,
    )


def abandon_request(session: Session, fence: Fence, *, error: str, error_type: str, reason: str) -> bool:
    """→ ``failed``, for good, leaving its request where fal holds it, unfollowed (``wanbatch
    cancel --abandon-other-key``: a request no key of ours can ask about any more). fal may
    still run and bill it: its estimate is counted as possibly billed (``ambiguous_usd``, as a
    submit of unknown outcome's; never for a simulation's)."""
    return _move(
        session,
        fence,
        JobState.FAILED,
        reason,
        error=error,
        error_type=error_type,
        ambiguous_usd=_POSSIBLY_BILLED_MORE,
    )


#: The key, in the details of the event that fails a job whose request fal's status said it did
#: not know (:func:`fail_lost_request`), saying that its estimate was then counted as possibly
#: billed (``ambiguous_usd``): what :func:`jobs.store.adopt_own_proof` takes back should fal's
#: signed webhook prove it ran that request to the end (then billed in full, once).
LOST_POSSIBLY_BILLED = "possibly_billed"


def fail_lost_request(
    session: Session, fence: Fence, *, error: str, error_type: str, reason: str, ran: bool
) -> bool:
    """→ ``failed``, for good: fal's status answered that it does not know the job's request
    (404, ``request_not_found``: fal forgot it, a queue reset, a request older than fal keeps).
    ``ran``: we saw it run (fal said IN_PROGRESS, or reported inference time), so fal may well
    have run it to the end and billed it — a request a runner took is billed whatever we are
    told of it afterwards, as a cancel of it is billed as running. Its estimate is then counted
    as possibly billed (``ambiguous_usd``, as a submit of unknown outcome's and an abandoned
    request's; never for a simulation's): in ``spent`` and against the budget caps, shown
    apart, and ``rerun --failed-only`` warns before paying for it again. One only ever seen in
    fal's queue never ran: fal bills nothing for it, and nothing is counted."""
    extra: dict[str, Any] = {}
    if ran:
        extra = {"ambiguous_usd": _POSSIBLY_BILLED_MORE, "details": {LOST_POSSIBLY_BILLED: True}}
    return _move(session, fence, JobState.FAILED, reason, error=error, error_type=error_type, **extra)


def fail_unsent(session: Session, fence: Fence, *, error: str, error_type: str | None) -> bool:
    """``submitting`` → ``failed``, for good, before the attempt's POST left this process (its
    input file changed or vanished): like :func:`give_back`, the attempt is not counted — a job
    never sent exports ``attempts`` 0 — and a job never sent is billed nothing
    (``actual_usd`` 0; one sent before keeps what its earlier attempts cost)."""
    return _move(
        session,
        fence,
        JobState.FAILED,
        error,
        error=error,
        error_type=error_type,
        attempts=_NOT_COUNTED,
        possible_duplicate_charges=_RESEND_UNSENT,
        actual_usd=_ZERO_IF_NEVER_SENT,
        actual_billing_units=_ZERO_UNITS_IF_NEVER_SENT,
    )


def give_back(
    session: Session, fence: Fence, *, reason: str, due_at: datetime | None = None, **fields: Any
) -> bool:
    """``submitting`` → ``pending``, the attempt not counted: its POST never left this process
    (a limit held it back, its input could not be prepared, the process stopped), or fal
    refused it unaccepted (429, the account). Due again at ``due_at`` (at once when None).

    A resend of an unknown submit whose send was recorded (:func:`record_send`) is uncounted
    from ``possible_duplicate_charges`` too: the same attempt number is sent again later, and
    counted then.

    Every caller gives back a POST that fal never accepted (never sent, or refused): what
    :func:`record_send` wrote of it (``submitted_input``, ``sent_at``) is cleared, so the job
    reads as not sent — a rerun given back is no request at fal, cancelled when the job it
    repeats keeps its late answer (:func:`_cancel_unsent_repeats`).

    ``start_timeout_at`` becomes that of the request still possibly at fal, which
    :func:`adopt_before_resend` keeps should its proof come: for a resend of a submit whose
    outcome stayed unknown, the earlier attempt's — still there when given back before its POST
    (:func:`mark_submitting` keeps it), put back from ``earlier_start_timeout_at`` when the POST
    was recorded (:func:`record_send` wrote the refused POST's over it). Was: a resend refused
    with 429 kept the refused POST's, and a schedule removed since made fal's unbilled
    ``request_timeout`` of the adopted earlier request count an attempt. Any other job has no
    request at fal (its earlier ones ended): NULL. The next POST writes its own."""
    unsent: dict[str, Any] = {
        "submitted_input": None,
        "sent_at": None,
        "start_timeout_at": _OUTSTANDING_START_TIMEOUT,
        **fields,
    }
    return _move(
        session,
        fence,
        JobState.PENDING,
        reason,
        attempts=_NOT_COUNTED,
        possible_duplicate_charges=_RESEND_UNSENT,
        next_attempt_at=due_at,
        **_UNLEASED,
        **unsent,
    )


#: The ``error_type`` of a job given back because its POST, though maybe recorded, never went out.
NOT_SENT = "not_sent"


def give_back_not_sent(session: Session, fence: Fence, why: str, *, due_at: datetime | None = None) -> bool:
    """:func:`give_back` of a job whose POST this process knows never went out (it failed inside
    the process, or its record's commit failed), ``why`` its reason and its error (``not_sent``)."""
    return give_back(session, fence, reason=why, due_at=due_at, error=why, error_type=NOT_SENT)


def mark_running(session: Session, fence: Fence, *, next_poll_at: datetime) -> bool:
    """``queued`` → ``running``: fal said IN_PROGRESS. Its status is asked again at ``next_poll_at``.

    Not synced on its own (:func:`jobs.db.covered`): lost to a power cut, the job is ``queued``
    again and its next status call says IN_PROGRESS again."""
    with db.covered(session):
        return _move(
            session, fence, JobState.RUNNING, "running at fal", next_attempt_at=next_poll_at, **_UNLEASED
        )


def status_due(session: Session, fence: Fence, *, at: datetime) -> bool:
    """Make a job whose request is at fal due for its next status call at ``at``: fal said the
    request finished, but not everything needed to settle the job (a webhook carries no run-time
    metrics, and what a failure or a cancel costs depends on them). No state change, no version
    bump, the lease left as it is: a status call already in flight settles the job itself."""
    return update_job_fields(session, fence.job_id, expected_version=fence.version, next_attempt_at=at)


def mark_completed(
    session: Session,
    fence: Fence,
    *,
    completed_at: datetime,
    provider_metrics: dict[str, Any] | None,
    error: str | None = None,
    error_type: str | None = None,
    lease_owner: str | None = None,
    lease_expires_at: datetime | None = None,
    row: dict[str, Any] | None = None,
) -> bool:
    """→ ``downloading``: fal finished the request (and billed it); its result is fetched next.

    fal reports a failed request as COMPLETED with ``error``/``error_type``: they are kept on the
    event, for the download step should the result itself be unobtainable. ``lease_owner``
    marks a download already queued for it (see ``worker.steps.context.DOWNLOAD_QUEUE``). The
    polling's count of malformed answers (``download_attempts``) is reset for the download.
    ``row``: filled with the job as moved (:func:`~jobs.store.transitions.transition`).

    Not synced on its own (:func:`jobs.db.covered`): lost to a power cut, the job is back where
    it was and asks fal's status and result again (free). The download it leads to syncs it
    before its video is renamed into place (:func:`jobs.db.sync_commits`).
    """
    failed = error is not None or error_type is not None
    with db.covered(session):
        return _move(
            session,
            fence,
            JobState.DOWNLOADING,
            "completed at fal" + (f" with error {error_type}" if failed else ""),
            details={"error": error, "error_type": error_type} if failed else None,
            row=row,
            completed_at=completed_at,
            provider_metrics=provider_metrics,
            download_attempts=0,
            lease_owner=lease_owner,
            lease_expires_at=lease_expires_at,
        )


def mark_succeeded(
    session: Session,
    fence: Fence,
    *,
    output_path: str,
    output_sha256: str,
    output_bytes: int,
    **cost: Any,
) -> bool:
    """``downloading`` → ``succeeded``: the video and its sidecar are saved; ``cost`` is what fal
    billed over every attempt."""
    return _move(
        session,
        fence,
        JobState.SUCCEEDED,
        "downloaded",
        output_path=output_path,
        output_sha256=output_sha256,
        output_bytes=output_bytes,
        error=None,
        error_type=None,
        **cost,
    )


#: What a reusing job copies from the job whose output it takes: the output and what fal said
#: about it, so exports, diffs and status read the same as for the original.
_REUSED_FIELDS = (
    "output_path",
    "output_sha256",
    "output_bytes",
    "seed",
    "actual_prompt",
    "provider_output",
    "media",
    "media_mismatch",
)


def find_reusable(session: Session, job: JobRecord, *, simulated: bool, limit: int) -> list[Job]:
    """Up to ``limit`` succeeded jobs (any batch of ``job``'s kind, not ``job`` itself) with
    ``job``'s key and a stored output of their own, oldest first; ``simulated``: whether ``job``'s
    batch was made by ``run --simulate``.

    Same key means same endpoint and same resolved input (files and data URIs by content), seed
    included. A job stored before schema 0022 whose data URI's new key its twin took (see
    :attr:`Job.content_key`) is looked up, and found, by the key its input gives now: the same
    image given twice under two spellings, or as a file and inline, is rendered once.
    Oldest first, so every reuse of one render names the same original while its output is
    there; the caller checks the outputs in that order and takes the first still intact (the
    original's may be gone while a rerun's is not). Jobs that reused another's output are left
    out: their output is their source's (the same ``output_path``), which is a candidate itself.
    A rerun's job that took back the paid video its original left staged
    (:func:`mark_taking_staged`) names that original in ``reused_from`` too, but stored the
    video itself, under its own path: it is a candidate — often the only copy there is, its
    original having failed without an output. Same kind: a batch sent to fal takes only videos
    fal made, never a ``--simulate`` batch's placeholders (and a simulation only simulated ones,
    so it rehearses exactly what the paid run will do).
    """
    key = job.content_key or job.job_key
    source = aliased(Job)
    # One query per key column, merged here: with ``job_key = k OR content_key = k`` SQLite's
    # planner (no statistics) walked ``ix_jobs_state_order`` over every succeeded job instead
    # (https://www.sqlite.org/optoverview.html#or_optimizations: the OR-by-union plan is only
    # weighed against the other indexes' guesses), a scan per claimed job inside the dispatch
    # round's write transaction: a 3,000-job reuse of a 33,000-job database took 450 s and
    # locked every other writer out. Each query alone searches its key's index.
    found: dict[str, Job] = {}
    for column in (Job.job_key, Job.content_key):
        query = (
            select(Job)
            .join(Batch, Batch.id == Job.batch_id)
            .where(
                column == key,
                Job.id != job.id,
                Job.state == JobState.SUCCEEDED,
                Job.output_sha256.is_not(None),
                Job.output_path.is_not(None),
                or_(
                    Job.reused_from.is_(None),
                    ~exists().where(source.id == Job.reused_from, source.output_path == Job.output_path),
                ),
                Batch.simulated.is_(simulated),
            )
            .order_by(Job.finished_at, Job.id)
            .limit(limit)
        )
        for twin in session.scalars(query):
            found.setdefault(twin.id, twin)
    return sorted(found.values(), key=_oldest_first)[:limit]


def _oldest_first(twin: Job) -> tuple[bool, datetime, str]:
    """The order of :func:`find_reusable`'s queries (``ORDER BY finished_at, id``) for their merged
    rows: a succeeded job always has ``finished_at``; one without (set by hand) comes last."""
    return (twin.finished_at is None, twin.finished_at or datetime.min, twin.id)


def mark_reused(session: Session, fence: Fence, source: Job) -> bool:
    """``pending``/``retry_wait`` → ``succeeded`` without sending: the job takes ``source``'s
    output (``reuse_outputs``). Nothing was billed for it, so its actual cost is 0."""
    return _move(
        session,
        fence,
        JobState.SUCCEEDED,
        f"reused the output of job {source.id}",
        details={"reused_from": source.id},
        reused_from=source.id,
        completed_at=utcnow(),
        actual_usd=Decimal(0),
        actual_billing_units=Decimal(0),
        error=None,
        error_type=None,
        **{name: getattr(source, name) for name in _REUSED_FIELDS},
    )


#: The reason of the event that moves a job adopted from the outputs folder to ``succeeded``
#: (:func:`mark_adopted`); :func:`adopted_count` counts a batch's jobs by it.


def mark_adopted(session: Session, fence: Fence, *, sidecar: str, **fields: Any) -> bool:
    """``pending``/``retry_wait`` → ``succeeded`` without sending: the job's own sidecar and its
    verified video in the output folder prove that fal rendered (and billed) a request of it
    that this database does not know of — it is behind them: a restored backup, or another copy
    of it that ran (``worker.steps.adopt``). ``fields``: the request, seed, cost and output as
    the sidecar records them; the event names the sidecar."""
    return _move(
        session,
        fence,
        JobState.SUCCEEDED,
        ADOPTED_REASON,
        details={"sidecar": sidecar, "request_id": fields.get("request_id")},
        error=None,
        error_type=None,
        **fields,
    )


def adopted_counts(session: Session, batch_ids: Collection[str]) -> dict[str, int]:
    """How many ``succeeded`` jobs of each of ``batch_ids`` were adopted from the outputs folder
    (:func:`mark_adopted`) rather than sent, in one query (each such job's events, by job); a
    batch with none is left out."""
    if not batch_ids:
        return {}
    # From the adopted events (their partial index, ix_job_events_adopted: the reason written
    # out, as SQLite uses a partial index only then) to their jobs, never from every event of
    # the batches' succeeded jobs.
    adopted = (
        select(JobEvent.job_id)
        .where(
            JobEvent.reason == literal_column(f"'{ADOPTED_REASON}'"), JobEvent.to_state == JobState.SUCCEEDED
        )
        .distinct()
        .subquery()
    )
    query = (
        select(Job.batch_id, func.count())
        .select_from(adopted)
        .join(Job, Job.id == adopted.c.job_id)
        .where(Job.batch_id.in_(sorted(batch_ids)), Job.state == JobState.SUCCEEDED)
        .group_by(Job.batch_id)
    )
    return {str(batch_id): int(count) for batch_id, count in session.execute(query)}


#: The ``error_type`` of a paid job whose video could not be kept (its batch was cancelled while
#: its output could not be stored): a rerun may take the video it left in the staging folder.
OUTPUT_NOT_KEPT = "output_not_kept"

#: What a job taking a staged video copies from the job that left it (:func:`mark_taking_staged`).
_TAKEN_FIELDS = ("seed", "actual_prompt", "provider_output", "completed_at")


def staged_original(session: Session, job: JobRecord, *, simulated: bool) -> Job | None:
    """The job ``job`` reruns (``rerun_of``) when that job failed with its paid video left
    staged (:data:`OUTPUT_NOT_KEPT`, the video's SHA-256 and size recorded), in a batch of the
    same kind as ``job``'s (``simulated``), and no other rerun of it is taking (``downloading``)
    or took (``succeeded``) that video already; else None. Whether the staged file is still
    there, and still those bytes, is the caller's to check."""
    if job.rerun_of is None:
        return None
    original = session.scalar(
        select(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(
            Job.id == job.rerun_of,
            Job.state == JobState.FAILED,
            Job.error_type == OUTPUT_NOT_KEPT,
            Job.output_sha256.is_not(None),
            Job.output_bytes.is_not(None),
            Batch.simulated.is_(simulated),
        )
    )
    if original is None:
        return None
    taken = session.scalar(
        select(Job.id)
        .where(
            Job.rerun_of == original.id,
            Job.id != job.id,
            Job.reused_from.is_not(None),
            Job.state.in_([JobState.DOWNLOADING, JobState.SUCCEEDED]),
        )
        .limit(1)
    )
    return None if taken is not None else original


def mark_taking_staged(session: Session, fence: Fence, original: Job, *, staged: str, **lease: Any) -> bool:
    """``pending``/``retry_wait`` → ``downloading`` without sending: the job takes the paid video
    ``original`` downloaded and left at ``staged`` (:func:`staged_original`), stores it like any
    download, and succeeds with ``reused_from`` naming the job fal made it for. Taking it bills
    nothing more (``original`` keeps what it was billed): the job keeps what fal billed its own
    earlier attempts, if it was sent before (a ``retry_wait`` after a request fal ran, cancelled
    or failed), else costs 0; its estimate becomes 0.
    ``lease``: ``lease_owner``/``lease_expires_at`` of its queued download, as for a completion."""
    source = original.reused_from or original.id  # a taker that failed in turn: the video's maker
    return _move(
        session,
        fence,
        JobState.DOWNLOADING,
        f"takes the paid video job {original.id} left in the staging folder ({staged}); not sent",
        details={"reused_from": source, "staged": staged},
        reused_from=source,
        actual_usd=_KEPT_USD,
        actual_billing_units=_KEPT_UNITS,
        # Not its estimate: while it waits in ``downloading`` (storage down) a job counts at what
        # it was billed plus its estimate in the budgets (:func:`finished_usd`), and this taking
        # will cost nothing more.
        est_usd=Decimal(0),
        download_attempts=0,
        error=None,
        error_type=None,
        **{name: getattr(original, name) for name in _TAKEN_FIELDS},
        **lease,
    )


def mark_cancelling(session: Session, fence: Fence, *, reason: str, error_type: str | None = None) -> bool:
    """``queued``/``running`` → ``cancelling``: a cancel was asked of fal; its status (how the
    request ended, and whether it was billed) is asked at once. ``error_type`` says why when it
    is not the user's cancel (``deadline``, ``window_closed``): it decides where the job goes."""
    extra = {"error_type": error_type} if error_type is not None else {}
    return _move(session, fence, JobState.CANCELLING, reason, next_attempt_at=utcnow(), **extra)


def requeue_after_cancel(
    session: Session,
    fence: Fence,
    *,
    reason: str,
    billed: bool,
    error: str,
    error_type: str | None,
    **cost: Any,
) -> bool:
    """``cancelling``/``queued``/``running`` → ``pending`` (cancelled, or timed out, while still
    in fal's queue: nothing billed) or ``retry_wait`` (fal had started it: billed), for a later
    window to send again. ``error`` says what ended the request.

    The request was sent: the job keeps its ``submitted_at``, its request id and the input it
    sent (what the export and the history show of it, until a later attempt replaces them),
    and the attempt stays in ``attempts``. One that never ran is also counted in
    ``unstarted_requests``, so it does not count against ``WANBATCH_MAX_ATTEMPTS``
    (:attr:`jobs.models.Job.counted_attempts`); one fal had started does.

    ``cost``: the job's ``actual_usd``/``actual_billing_units`` after this request
    (:func:`jobs.billing.billed`: earlier attempts plus this one's bill), written either way. An
    unbilled request is known to have cost nothing, so the job then holds what earlier attempts
    cost, 0 when none did — not "unknown": should the deadline end it before it is sent again,
    its cost is $0 like any other request that never ran, and a later attempt adds to it.
    The caller puts how the cancel was billed in the event's details (:data:`CANCEL_BILLED_AS`),
    taken back should fal prove it ran the request to the end (:func:`adopt_window_proof`)."""
    fields = {**_FORGET_URLS, **_UNLEASED, "error": error, "error_type": error_type, **cost}
    if billed:
        return _move(session, fence, JobState.RETRY_WAIT, reason, **fields)
    return _move(
        session,
        fence,
        JobState.PENDING,
        reason,
        unstarted_requests=incremented("unstarted_requests"),
        **fields,
    )


def mark_cancelled(
    session: Session, fence: Fence, *, reason: str, error: str, error_type: str | None, **fields: Any
) -> bool:
    """→ ``cancelled``, for good: a budget stopped it, or fal confirmed a cancel (``fields``: the
    cancel's cost and what fal reported)."""
    return _move(session, fence, JobState.CANCELLED, reason, error=error, error_type=error_type, **fields)


def record_result(
    session: Session, fence: Fence, *, output: dict[str, Any], seed: int | None, actual_prompt: str | None
) -> bool:
    """Keep fal's result of a ``downloading`` job (no state change): the video is fetched next,
    with its own count of tries."""
    return update_job_fields(
        session,
        fence.job_id,
        expected_version=fence.version,
        provider_output=output,
        seed=seed,
        actual_prompt=actual_prompt,
        download_attempts=0,
    )


#: What a job's earlier attempts cost, 0 when none was billed: its cost once it takes a video
#: that costs it nothing more (:func:`mark_taking_staged`).
_KEPT_USD = func.coalesce(_JOBS.c.actual_usd, literal(Decimal(0), _JOBS.c.actual_usd.type))
_KEPT_UNITS = func.coalesce(
    _JOBS.c.actual_billing_units, literal(Decimal(0), _JOBS.c.actual_billing_units.type)
)
