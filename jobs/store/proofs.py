"""State changes by intent, proof arriving late: a webhook or an answer proving that fal has (or
ran) a request we had given up on — a failed, cancelled, resent or window-ended job adopts it,
and a duplicate charge is noted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from jobs import billing
from jobs.models import Batch, JobEvent, WebhookDelivery
from jobs.states import JobState
from jobs.store.core import _JOBS, _refresh_loaded, _run
from jobs.store.outcomes import LOST_POSSIBLY_BILLED
from jobs.store.reading import seen_running_since_submit
from jobs.store.repeats import _cancel_unsent_repeats, sent_repeat
from jobs.store.transitions import (
    _INSERT_EVENT,
    _UNLEASED,
    Fence,
    _add_finished,
    _move,
    finished_usd,
    refuse_held_request,
    request_holder,
)
from jobs.store.webhook_inbox import DuplicateNote, request_known

#: What a failed job's error type says when it failed only because its submit's outcome stayed
#: unknown (:func:`adopt_late_proof`; ``worker.steps.failures.settle_unknown_submit``).
SUBMIT_UNKNOWN_ERROR = "submit_unknown"


def _locked_unmoved(session: Session, fence: Fence) -> Any:
    """The job's row, locked for the rest of the transaction, when it is still where ``fence``
    saw it (same state, same version); None when it is gone or has moved on. What every adoption
    of a proof checks first, before it reads the row's own conditions."""
    found = _run(session, select(_JOBS).where(_JOBS.c.id == fence.job_id).with_for_update()).first()
    if found is None or found.state != fence.state or found.version != fence.version:
        return None
    return found


def _proved_request(
    found: Any, request_id: str, gateway_request_id: str | None, next_poll_at: datetime
) -> dict[str, Any]:
    """What a job that adopts a request proved after the fact (:func:`adopt_late_proof`,
    :func:`adopt_before_resend`) writes: the request (its URLs derived from the configured
    queue), no error, unleased, and the estimate the unknown submit put in ``ambiguous_usd``
    ("possibly billed") taken out of it — the request is now the job's own, counted once."""
    return {
        "request_id": request_id,
        "gateway_request_id": gateway_request_id,
        "status_url": None,
        "response_url": None,
        "cancel_url": None,
        "next_attempt_at": next_poll_at,
        "error": None,
        "error_type": None,
        "ambiguous_usd": found.ambiguous_usd - min(found.ambiguous_usd, found.est_usd),
        **_UNLEASED,
    }


def _settle_repeats(
    session: Session, found: Any, request_id: str, reason: str, fields: dict[str, Any]
) -> str:
    """What becomes of the reruns of ``found`` (a failed or cancelled job, locked, unmoved) now
    that it adopts fal's request ``request_id`` and gets its video from it: ``reason`` with it
    said, and ``fields`` (what the adoption writes) added to. Every adoption of such a job calls
    it, as ``rerun --failed-only`` repeats failed and cancelled jobs alike.

    A rerun not sent yet (``pending``, ``retry_wait``, claimed with its POST not recorded) is not
    sent at all (:func:`_cancel_unsent_repeats`: ``cancelled``, :data:`REPEAT_NOT_SENT_ERROR`),
    first, so that a send recorded before it is found next. A rerun already sent
    (:func:`sent_repeat`) is left as it is, with its own request and video: fal renders and bills
    the input twice, one more ``confirmed_duplicate_charges`` on ``found``."""
    unsent = _cancel_unsent_repeats(session, found, request_id)
    if unsent:
        reason += f"; its rerun (job {', '.join(unsent)}), not sent yet, is cancelled: nothing paid twice"
    repeat = sent_repeat(session, found)
    if repeat is not None:  # ``rerun --failed-only`` sent it too: the same input billed twice
        fields["confirmed_duplicate_charges"] = found.confirmed_duplicate_charges + 1
        reason += (
            f"; its rerun, job {repeat}, was sent too: fal renders and bills this input twice "
            "(a confirmed duplicate charge)"
        )
    return reason


def adopt_late_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``failed`` → ``queued``: after ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` (or the policy at
    once) failed the job, proof comes that fal accepted one of the job's attempts (``attempt``:
    its last, or an earlier one sent again by ``resubmit``) as ``request_id``: fal's signed
    webhook (the request finished, so fal billed it) or the submit's late answer (accepted: it
    runs, and is billed). The one move out of a terminal state
    (:mod:`jobs.states`): the job keeps that request and goes on as any adopted request does —
    polled, its video fetched; nothing is sent again. When a rerun of the job
    (``rerun --failed-only``, another batch) was sent meanwhile (:func:`sent_repeat`), fal bills
    that input twice: one more ``confirmed_duplicate_charges`` on this job, said in ``reason``;
    a rerun not sent yet is cancelled first instead (:func:`_cancel_unsent_repeats`), so the
    input is paid once.

    Only a job that failed for that reason alone qualifies: ``error_type`` ``submit_unknown``,
    ``attempt`` one it sent, no request kept, no output (so a video is never fetched over another).
    The money stays counted once: the estimate that the proved submit put in ``ambiguous_usd``
    ("possibly billed") leaves it (a later attempt's stays: still possibly billed), and the job's
    share of its batch's finished money is taken back (it is in flight again; its success counts
    it, billed in full). The row is locked first, so the figures taken back are the ones the job
    was finished with. ``fetched``: what the webhook already carries of fal's result (``provider_output``,
    ``seed``, ``actual_prompt``), kept for the download. False when the job does not qualify or
    moved on (compare-and-set on ``fence``).
    """
    if fence.state != JobState.FAILED:
        return False
    found = _locked_unmoved(session, fence)
    if (
        found is None
        or found.error_type != SUBMIT_UNKNOWN_ERROR
        or not 1 <= attempt <= found.attempts
        or found.request_id is not None
        or found.output_path is not None
    ):
        return False
    # Before any write: a request another job holds is refused with nothing done (a rerun
    # cancelled below for a request the job then does not keep would never be sent).
    refuse_held_request(session, found.id, request_id)
    before = finished_usd(JobState.FAILED, found.actual_usd, found.est_usd, found.ambiguous_usd)
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    reason = _settle_repeats(session, found, request_id, reason, adopted)
    moved = _move(session, fence, JobState.QUEUED, reason, finished_at=None, **adopted, **fetched)
    if moved:
        _add_finished(session, found.batch_id, found.submitted_at, -before)
    return moved


#: The errors of a job failed while its own request was at fal, without knowing how fal ended
#: it: the poller gave up on fal's malformed status answers (``provider_protocol_error``, after
#: a best-effort cancel, billed as one), or fal's status said it did not know the request
#: (``request_not_found``: its estimate possibly billed once it was seen running,
#: :func:`~jobs.store.fail_lost_request`). fal may have run and billed it all the same, and
#: its signed webhook then proves it (:func:`adopt_own_proof`).
PROVABLE_FAILURES = frozenset({"provider_protocol_error", "request_not_found"})


def _into_failed(session: Session, job_id: str) -> Any:
    """The job's last move into ``failed`` (its ``from_state`` and ``details``), or None.

    The failure is the job's last move into ``failed``: an event from another state. A note on
    the failed job's history moves nothing (``failed`` → ``failed``: a confirmed duplicate
    charge, :func:`note_duplicate_charge`; a late answer, :func:`note_request`) and says
    nothing of that attempt: read as the failure, its ``failed`` would pass for "not queued",
    and a cancel while running would be taken back — from money a duplicate charge billed."""
    into_failed = (
        select(JobEvent.from_state, JobEvent.details)
        .where(
            JobEvent.job_id == job_id,
            JobEvent.to_state == JobState.FAILED,
            or_(JobEvent.from_state.is_(None), JobEvent.from_state != JobState.FAILED),
        )
        .order_by(JobEvent.id.desc())
        .limit(1)
    )
    return session.execute(into_failed).first()


def _failure_bill(session: Session, found: Any) -> dict[str, Decimal]:
    """What the failure of ``found`` (a job in :data:`PROVABLE_FAILURES`) put in its actual cost
    for the attempt it ended: a protocol error is billed as a cancel, in fal's queue (nothing) or
    running (``worker.steps.poll._protocol_error``), by the state it failed from; a request fal
    did not know, nothing (what it may have cost is counted apart: :func:`_failure_possibly_billed`)."""
    zero = {"actual_billing_units": Decimal(0), "actual_usd": Decimal(0)}
    if found.error_type != "provider_protocol_error":
        return zero
    event = _into_failed(session, found.id)
    came_from = None if event is None else event.from_state
    queued = came_from is None or JobState(came_from) == JobState.QUEUED
    outcome = billing.Outcome.CANCELLED_IN_QUEUE if queued else billing.Outcome.CANCELLED_RUNNING
    return billing.billed(outcome, found.est_billing_units, found.est_usd)


def _failure_possibly_billed(session: Session, found: Any) -> Decimal:
    """What the failure of ``found`` (a job in :data:`PROVABLE_FAILURES`) counted as possibly
    billed for the attempt it ended (``ambiguous_usd``): the estimate of a request fal did not
    know after it was seen running, as its failure's event says (:data:`LOST_POSSIBLY_BILLED`);
    nothing otherwise — what earlier submits of unknown outcome may have cost stays counted."""
    if found.error_type != "request_not_found":
        return Decimal(0)
    event = _into_failed(session, found.id)
    details = event.details if event is not None and isinstance(event.details, dict) else {}
    if not details.get(LOST_POSSIBLY_BILLED):
        return Decimal(0)
    return Decimal(min(found.ambiguous_usd, found.est_usd))


def _taken_back(found: Any, bill: dict[str, Decimal]) -> dict[str, Any]:
    """``found``'s actual cost and billing units with ``bill`` taken back: what the end it is
    moved out of billed for the request fal now proves ran (the success bills it in full)."""
    prior: dict[str, Any] = {}
    if found.actual_usd is not None:
        prior["actual_usd"] = max(Decimal(0), found.actual_usd - bill["actual_usd"])
    if found.actual_billing_units is not None:
        units = found.actual_billing_units - bill["actual_billing_units"]
        prior["actual_billing_units"] = max(Decimal(0), units)
    return prior


def _requeue_proved(
    session: Session,
    fence: Fence,
    found: Any,
    reason: str,
    next_poll_at: datetime,
    fields: dict[str, Any],
    fetched: dict[str, Any],
) -> bool:
    """Move ``found`` (locked, unmoved) to ``queued`` on the request fal proved it ran, to fetch
    its video as any adopted request does: no error, no lease, a fresh count of malformed
    answers (``download_attempts``), ``fields`` and ``fetched`` (what fal's result carries) set.
    A job that had ended gives its share of its batch's finished money back (it is in flight
    again), and its reruns are settled (:func:`_settle_repeats`: ``rerun --failed-only`` repeats
    failed and cancelled jobs). The one move the ``adopt_*_proof`` functions share;
    compare-and-set on ``fence``."""
    state = JobState(found.state)
    before = None
    if state.terminal:
        before = finished_usd(state, found.actual_usd, found.est_usd, found.ambiguous_usd)
        fields = dict(fields)
        reason = _settle_repeats(session, found, str(found.request_id), reason, fields)
    moved = _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        finished_at=None,
        next_attempt_at=next_poll_at,
        error=None,
        error_type=None,
        download_attempts=0,
        **_UNLEASED,
        **fields,
        **fetched,
    )
    if moved and before is not None:
        _add_finished(session, found.batch_id, found.submitted_at, -before)
    return moved


def adopt_own_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``failed`` → ``queued``: fal's signed webhook proves that it ran and finished (so billed)
    the job's own request ``request_id``, after the job failed without knowing how fal ended it
    (:data:`PROVABLE_FAILURES`): the job goes on as any adopted request does, its video fetched
    from the result the webhook carries (``fetched``), and billed as the success it is.

    Only such a job qualifies: still keeping ``request_id``, no output. The money stays counted
    once: what its failure billed for the attempt (a cancel: :func:`_failure_bill`) leaves its
    actual cost, and what it counted as possibly billed (a lost request seen running:
    :func:`_failure_possibly_billed`) leaves ``ambiguous_usd``, the success then billing the
    attempt in full; its share of its batch's finished
    money is taken back (it is in flight again). Its count of malformed status answers
    (``download_attempts``) starts afresh for the download. The row is locked first. False when
    the job does not qualify or moved on (compare-and-set on ``fence``).
    """
    if fence.state != JobState.FAILED:
        return False
    found = _locked_unmoved(session, fence)
    if (
        found is None
        or found.error_type not in PROVABLE_FAILURES
        or found.request_id != request_id
        or found.output_path is not None
    ):
        return False
    fields = _taken_back(found, _failure_bill(session, found))
    if possibly := _failure_possibly_billed(session, found):  # now billed in full, by the success
        fields["ambiguous_usd"] = found.ambiguous_usd - possibly
    return _requeue_proved(session, fence, found, reason, next_poll_at, fields, fetched)


#: The key, in the details of the event that ends a job ``cancelled`` on fal's word that our
#: cancel ended its request (``worker.steps.poll.record_completion``, a deadline's cancel), of
#: the :class:`~jobs.billing.Outcome` that cancel was billed as: what :func:`adopt_cancelled_proof`
#: takes back once fal proves it ran the request to the end after all.
CANCEL_BILLED_AS = "billed_as"
#: The states from which a job ends ``cancelled`` on fal's word about its own request.
_CANCELLED_AT_FAL = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})


def _into_cancelled(session: Session, job_id: str) -> Any:
    """The job's last move into ``cancelled`` (its ``from_state`` and ``details``), or None: a
    note on a cancelled job's history moves nothing (``cancelled`` → ``cancelled``) and is not
    it."""
    into_cancelled = (
        select(JobEvent.from_state, JobEvent.details)
        .where(
            JobEvent.job_id == job_id,
            JobEvent.to_state == JobState.CANCELLED,
            or_(JobEvent.from_state.is_(None), JobEvent.from_state != JobState.CANCELLED),
        )
        .order_by(JobEvent.id.desc())
        .limit(1)
    )
    return session.execute(into_cancelled).first()


def _cancel_bill(session: Session, found: Any) -> dict[str, Decimal] | None:
    """What the cancel that ended ``found`` (a ``cancelled`` job) put in its actual cost for its
    request, or None when it was not ended there by fal's word on that request (a budget, or
    ``wanbatch cancel`` of a job fal held none of: it keeps at most an ended request's id).

    The cancel is the job's last move into ``cancelled`` (a note on its history moves nothing,
    ``cancelled`` → ``cancelled``); its details say how it was billed. One recorded before they
    did: billed as running when fal reported run time or its history since the submit has it
    ``running`` (:func:`seen_running_since_submit`, the rule the poller applied), else as in
    fal's queue."""
    event = _into_cancelled(session, found.id)
    if event is None or event.from_state is None or JobState(event.from_state) not in _CANCELLED_AT_FAL:
        return None
    said = (event.details or {}).get(CANCEL_BILLED_AS) if isinstance(event.details, dict) else None
    if said in {o.value for o in billing.Outcome}:
        outcome = billing.Outcome(said)
    elif billing.ran(found.provider_metrics) or seen_running_since_submit(session, found.id):
        outcome = billing.Outcome.CANCELLED_RUNNING
    else:
        outcome = billing.Outcome.CANCELLED_IN_QUEUE
    return billing.billed(outcome, found.est_billing_units, found.est_usd)


def adopt_cancelled_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``cancelled`` → ``queued``: fal's signed webhook proves that it ran and finished (so billed
    in full) the job's own request ``request_id``, which fal's status had said our cancel ended
    (``wanbatch cancel``, the dashboard's, a deadline's): fal's cancel of a running request is
    best effort, and the model may finish it anyway. The job goes on as any adopted request
    does, its video fetched from the result the webhook carries (``fetched``), and billed as the
    success it is — as a request that finishes while ``cancelling`` is (``cancelling`` →
    ``downloading``). Its batch stays cancelled: nothing is sent.

    Only such a job qualifies (:func:`_cancel_bill`): still keeping ``request_id``, no output.
    The money stays counted once: what the cancel billed (nothing in fal's queue, in full
    running) leaves its actual cost, which the success then bills in full, and its share of its
    batch's finished money is taken back (it is in flight again). The row is locked first.
    False when the job does not qualify or moved on (compare-and-set on ``fence``).
    """
    if fence.state != JobState.CANCELLED:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or found.request_id != request_id or found.output_path is not None:
        return False
    bill = _cancel_bill(session, found)
    if bill is None:
        return False
    return _requeue_proved(session, fence, found, reason, next_poll_at, _taken_back(found, bill), fetched)


#: The states a request is at fal in, as the job's history records it; the move out of them is
#: how we recorded that request's end (:func:`window_end`).
_AT_FAL_STATES = frozenset({JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING})
#: Where a window's end (or fal's start timeout) puts a job whose request it ended
#: (:func:`requeue_after_cancel`).
_REQUEUED = frozenset({JobState.PENDING, JobState.RETRY_WAIT})


@dataclass(frozen=True)
class WindowEnd:
    """How we recorded the end of a request of a job that a batch's window end (or fal's start
    timeout) cancelled, the job put back to wait for the next window (:func:`window_end`):
    ``requeued_to`` (``pending``: unbilled, counted in ``unstarted_requests``; ``retry_wait``:
    billed, it had started) and what the cancel put in the job's actual cost for it (``bill``)."""

    requeued_to: JobState
    bill: dict[str, Decimal]


def _names_request(reason: str | None, request_id: str) -> bool:
    """Whether an event's ``reason`` says fal accepted ``request_id`` ("accepted as <id>"),
    that id and not one it begins."""
    text = reason or ""
    marker = f"accepted as {request_id}"
    start = text.find(marker)
    while start >= 0:
        end = start + len(marker)
        if end == len(text) or not (text[end].isalnum() or text[end] in "-_"):
            return True
        start = text.find(marker, end)
    return False


def window_end(session: Session, found: Any, request_id: str) -> WindowEnd | None:
    """How the job ``found`` recorded the end of its request ``request_id`` when a window's end
    (or the start timeout its submit carried) cancelled it and the job went back to wait for
    the next window (:func:`requeue_after_cancel`, from ``worker.steps.schedule.end_unstarted``);
    None when that request ended otherwise (a failure, a success, the user's cancel), or has not
    ended, or was never the job's.

    The request's end is the latest move of the job out of fal's states (``queued``,
    ``running``, ``cancelling``) since fal accepted it (the last move that says "accepted as
    <id>"): a request adopted back once (:func:`adopt_window_proof`) has ended otherwise since.
    The move says how the cancel was billed (its details' :data:`CANCEL_BILLED_AS`); one recorded
    before it did is read as unbilled when it went to ``pending`` (only a request that never
    ran goes there), and not at all otherwise (``retry_wait`` may be a failure's)."""
    events = session.execute(
        select(JobEvent.from_state, JobEvent.to_state, JobEvent.reason, JobEvent.details)
        .where(JobEvent.job_id == found.id)
        .order_by(JobEvent.id)
    ).all()
    accepted = False
    last_exit: Any = None
    for moved in events:
        if moved.from_state is None or moved.from_state == moved.to_state:
            continue  # a note (a duplicate charge, a late answer) moves nothing
        moved_from, moved_to = JobState(moved.from_state), JobState(moved.to_state)
        if moved_to in _AT_FAL_STATES and _names_request(moved.reason, request_id):
            accepted, last_exit = True, None
        elif moved_to in _AT_FAL_STATES and "accepted as " in (moved.reason or ""):
            accepted = False  # another request of the job: the one asked for had ended before
        elif accepted and moved_from in _AT_FAL_STATES and moved_to not in _AT_FAL_STATES:
            last_exit = moved
    if last_exit is None or JobState(last_exit.to_state) not in _REQUEUED:
        return None
    details = last_exit.details if isinstance(last_exit.details, dict) else {}
    said = details.get(CANCEL_BILLED_AS)
    requeued_to = JobState(last_exit.to_state)
    if said in {o.value for o in billing.Outcome}:
        outcome = billing.Outcome(said)
    elif requeued_to == JobState.PENDING:
        outcome = billing.Outcome.CANCELLED_IN_QUEUE
    else:
        return None
    return WindowEnd(requeued_to, billing.billed(outcome, found.est_billing_units, found.est_usd))


#: The states from which a job adopts its own request that a window's end was said to end
#: (:func:`adopt_window_proof`): waiting for the next window, claimed for it but its POST not
#: sent, or ended since without sending again (a cancel of its batch, the deadline).
_WINDOW_PROOF_STATES = frozenset(
    {JobState.PENDING, JobState.RETRY_WAIT, JobState.SUBMITTING, JobState.CANCELLED}
)


def window_proof_adoptable(job: Any) -> bool:
    """Whether ``job`` (a :class:`~jobs.models.Job` or a row of its columns), still keeping the
    request a window's end was said to end, has sent nothing since: it waits for the next window
    (``pending``, ``retry_wait``, or ``submitting`` before its POST is recorded as sent) or ended
    unsent (``cancelled``), no output. A proof that fal ran that request to the end is then
    adopted (:func:`adopt_window_proof`); once the job sent again, it is a duplicate charge."""
    state = JobState(job.state)
    if state not in _WINDOW_PROOF_STATES or job.output_path is not None or job.request_id is None:
        return False
    return not (state == JobState.SUBMITTING and job.submitted_input is not None)


def adopt_window_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``pending``/``retry_wait``/``submitting``/``cancelled`` → ``queued``: fal's signed webhook
    proves that it ran to the end (so billed in full) the job's own request ``request_id``, which
    its batch's window end cancelled (:func:`window_end`): fal's cancel of a running request is
    best effort. The job, which waited to send it again in the next window
    (:func:`window_proof_adoptable`), keeps that request instead and goes on as any adopted
    request does, its video fetched from the result the webhook carries (``fetched``): nothing is
    sent again, nothing is paid twice. A resend claimed by a submit step loses its lease, and its
    send (fenced by version) finds the job moved.

    The attempts are those sent (a resend claimed but not sent is not counted, as
    :func:`give_back` does); a request that was counted as never started
    (``unstarted_requests``) ran. The money stays counted once: what the window's cancel billed
    (nothing in fal's queue, in full running) leaves the job's actual cost, which the success
    then bills in full; a ``cancelled`` job's share of its batch's finished money is taken back
    (it is in flight again). The row is locked first. False when the job does not qualify or
    moved on (compare-and-set on ``fence``).
    """
    if fence.state not in _WINDOW_PROOF_STATES:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or found.request_id != request_id or not window_proof_adoptable(found):
        return False
    ended = window_end(session, found, request_id)
    if ended is None:
        return False
    fields = _taken_back(found, ended.bill) | {"attempts": sent_attempts(found)}
    if ended.requeued_to == JobState.PENDING and found.unstarted_requests > 0:
        fields["unstarted_requests"] = found.unstarted_requests - 1  # it ran
    return _requeue_proved(session, fence, found, reason, next_poll_at, fields, fetched)


#: The key, in the details of the note of a confirmed duplicate charge
#: (:func:`note_window_duplicate`), of the request a window's end was said to end and fal ran.
WINDOW_DUPLICATE = "duplicate_of_window_end"


def note_window_duplicate(
    session: Session,
    job_id: str,
    request_id: str,
    *,
    reason: str,
    worker: str | None,
    now: datetime,
) -> DuplicateNote:
    """fal's signed webhook proves that it ran to the end (billed in full) ``request_id``, a
    request of the job that its batch's window end cancelled (:func:`window_end`), after the job
    sent a new request in its place: fal ran and billed the job twice, a *confirmed* duplicate
    charge. In the job's books, once: one more ``confirmed_duplicate_charges``, on its history
    (an event that moves nothing, its details naming the request), and the success's bill in
    its actual cost in place of what the window's cancel billed (nothing in fal's queue, in full
    running). A finished job's share of its batch's running totals moves by the difference.

    ``held`` while a worker holds the job's lease (it bills the job from what it read: try
    later); ``known`` when the request was counted already, or did not end at a window's end;
    ``missing``: no such job. The row is locked first."""
    found = _run(session, select(_JOBS).where(_JOBS.c.id == job_id).with_for_update()).first()
    if found is None:
        return "missing"
    if found.lease_owner is not None and found.lease_expires_at is not None and found.lease_expires_at > now:
        return "held"
    notes = session.execute(
        select(JobEvent.details).where(JobEvent.job_id == job_id, JobEvent.from_state == JobEvent.to_state)
    ).scalars()
    if any(isinstance(d, dict) and d.get(WINDOW_DUPLICATE) == request_id for d in notes):
        return "known"
    ended = window_end(session, found, request_id)
    if ended is None:
        return "known"
    state = JobState(found.state)
    own = state == JobState.SUCCEEDED  # billed its estimate when no cost was recorded (finished_usd)
    prior_usd = found.actual_usd if found.actual_usd is not None else (found.est_usd if own else Decimal(0))
    units = found.actual_billing_units
    prior_units = units if units is not None else (found.est_billing_units if own else Decimal(0))
    success = billing.billed(billing.Outcome.SUCCEEDED, found.est_billing_units, found.est_usd)
    written: dict[str, Any] = {
        "confirmed_duplicate_charges": found.confirmed_duplicate_charges + 1,
        "actual_usd": prior_usd + max(Decimal(0), success["actual_usd"] - ended.bill["actual_usd"]),
        "actual_billing_units": prior_units
        + max(Decimal(0), success["actual_billing_units"] - ended.bill["actual_billing_units"]),
    }
    if state.terminal:
        before = finished_usd(state, found.actual_usd, found.est_usd, found.ambiguous_usd)
        after = finished_usd(state, written["actual_usd"], found.est_usd, found.ambiguous_usd)
        _add_finished(session, found.batch_id, found.submitted_at, after - before)
    _run(session, update(_JOBS).where(_JOBS.c.id == job_id).values(**written, updated_at=now))
    _refresh_loaded(session, job_id, written)
    event = {"job_id": job_id, "at": now, "from_state": state, "to_state": state, "version": found.version}
    event.update(reason=reason, details={WINDOW_DUPLICATE: request_id}, worker=worker)
    _run(session, _INSERT_EVENT, event)
    return "counted"


@dataclass(frozen=True)
class StoredProof:
    """A stored success delivery (:func:`stored_proof`): which attempt of the job it proves, as
    which request, and fal's body (its ``payload`` is the result)."""

    delivery_id: int
    attempt: int
    request_id: str
    gateway_request_id: str | None
    body: dict[str, Any]


def stored_proof(
    session: Session,
    job_id: str,
    *,
    attempts: int,
    ours: Callable[[WebhookDelivery], bool] = lambda _delivery: True,
) -> StoredProof | None:
    """The newest success fal's webhooks delivered for one of ``job_id``'s attempts 1 to
    ``attempts`` whose request the job never recorded (:func:`request_known`: not adopted, not
    counted as a duplicate charge): proof, in whatever order it came, that fal ran that attempt
    (``worker.steps.failures.settle_unknown_submit`` reads it before resending or failing a job
    whose submit's outcome stayed unknown). The latest attempt first. ``ours``: whether a
    delivery is our fal account's (``worker.steps.accounts.account_verdict``); one signed for
    another proves nothing."""
    found = (
        select(WebhookDelivery)
        .where(
            WebhookDelivery.job_id == job_id,
            WebhookDelivery.status == "OK",
            WebhookDelivery.attempt >= 1,
            WebhookDelivery.attempt <= attempts,
        )
        .order_by(WebhookDelivery.attempt.desc(), WebhookDelivery.id)
    )
    for delivery in session.scalars(found):
        if delivery.attempt is None or request_known(session, job_id, delivery.request_id):
            continue
        if request_holder(session, job_id, delivery.request_id) is not None:
            continue  # another job's request: no proof of this job's (a provider protocol error)
        if not ours(delivery):
            continue  # signed for another fal account: its request is not ours
        body = delivery.body if isinstance(delivery.body, dict) else {}
        gateway = body.get("gateway_request_id")
        return StoredProof(
            delivery.id,
            delivery.attempt,
            delivery.request_id,
            gateway if isinstance(gateway, str) else None,
            body,
        )
    return None


#: The states of a job whose resend of an unknown submit has not gone out yet: decided
#: (``retry_wait``), given back before its POST (``pending``), or claimed but its POST not
#: recorded as sent (``submitting`` without ``submitted_input``) — :func:`resend_unsent`.
_RESEND_WAITS = frozenset({JobState.RETRY_WAIT, JobState.PENDING, JobState.SUBMITTING})


def resend_unsent(job: Any, attempt: int) -> bool:
    """Whether ``job`` (a :class:`~jobs.models.Job` or a row of its columns) is to resend its
    ``attempt``, a submit whose outcome stayed unknown (``WANBATCH_SUBMIT_UNKNOWN_POLICY``
    ``resubmit``), and that resend has not gone out: proof that fal accepted ``attempt`` then
    replaces it (:func:`adopt_before_resend`). Once the resend's POST is recorded as sent
    (``submitting`` with its input, or any later state) a proof of ``attempt`` is a duplicate."""
    return _resend_unsent_in(JobState(job.state), job, attempt)


def _resend_unsent_in(state: JobState, job: Any, attempt: int) -> bool:
    """:func:`resend_unsent` of ``job`` as it was in ``state`` (a cancel keeps its other columns)."""
    if state not in _RESEND_WAITS or job.request_id is not None or job.output_path is not None:
        return False
    if job.resend_attempt != attempt + 1:
        return False
    if state == JobState.SUBMITTING:
        return bool(job.attempts == attempt + 1 and job.submitted_input is None)
    return bool(job.attempts == attempt)


def adopt_before_resend(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``retry_wait``/``pending``/``submitting`` → ``queued``: proof (fal's signed webhook, or the
    submit's late answer) that fal accepted ``attempt`` as ``request_id`` comes while the job
    waits to resend that attempt, whose outcome had stayed unknown, and before the resend went
    out (:func:`resend_unsent`). The job keeps the proved request and the resend is dropped:
    nothing is paid twice.

    The attempts are those sent: ``attempt`` (a resend claimed but not sent is not counted, as
    :func:`give_back` does), and no resend is pending any more (``resend_attempt`` cleared, so a
    later retry of the request is no possible duplicate). The money stays counted once: the
    estimate the unknown submit put in ``ambiguous_usd`` ("possibly billed") leaves it, as the
    request is now the job's own, reserved while fal holds it and billed when it ends. A resend
    claimed by a submit step loses its lease: its send (:func:`record_send`, fenced by version)
    then finds the job moved and sends nothing. The row is locked first. ``fetched``: what a
    webhook carries of fal's result (:func:`adopt_late_proof`). False when the job does not
    qualify or moved on (compare-and-set on ``fence``).
    """
    if fence.state not in _RESEND_WAITS:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or not resend_unsent(found, attempt):
        return False
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    return _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        attempts=attempt,
        resend_attempt=None,
        **adopted,
        **fetched,
    )


#: The states of a job that has no live request of its own and may still send one, in which a
#: proof of an earlier attempt is adopted (:func:`adopt_earlier_proof`).
_EARLIER_PROOF_STATES = frozenset({JobState.SUBMIT_UNKNOWN, *_RESEND_WAITS})


def sent_attempts(job: Any) -> int:
    """How many of ``job``'s attempts went out: a resend claimed (``submitting``) whose POST is
    not recorded as sent is not one (:func:`give_back` does not count it either)."""
    unsent = JobState(job.state) == JobState.SUBMITTING and job.submitted_input is None
    return int(job.attempts) - 1 if unsent else int(job.attempts)


def earlier_proof_adoptable(job: Any, attempt: int) -> bool:
    """Whether ``job`` (a :class:`~jobs.models.Job` or a row of its columns) is to keep a proved
    success of its ``attempt``, an earlier one than the attempt it waits on or is to send: it
    has no live request of its own and no output, and is waiting on an unknown submit
    (``submit_unknown``, no request id: then ``attempt`` is an earlier one than that submit,
    which a proof of the very attempt adopts as its own, :func:`adopt_request`), or is to send
    again (``retry_wait``, ``pending``, ``submitting`` before its POST is recorded as sent).

    A job waiting to send again may keep the id of its last accepted request (:func:`retry_later`,
    :func:`requeue_after_cancel`, :func:`give_back` keep it as history), but that request has
    ended: every move into those states is taken on fal's verdict that it ended (a failure it
    reported, a cancel or start timeout it reported done), on a POST it refused or that never
    went out (the id then an earlier, ended attempt's), or forgets the id (an unknown submit,
    :func:`mark_submit_unknown`). The job sends again, paying again: a paid success of an
    earlier attempt is kept instead. The kept request itself is never this proof
    (:func:`request_known` finds it first)."""
    state = JobState(job.state)
    if state not in _EARLIER_PROOF_STATES or job.output_path is not None:
        return False
    if state == JobState.SUBMIT_UNKNOWN and job.request_id is not None:
        return False  # never so (its request forgotten): a request kept is one fal may hold
    if state == JobState.SUBMITTING and job.submitted_input is not None:
        return False  # its POST is out: its answer or its outcome decides
    last = sent_attempts(job)
    return 1 <= attempt < last if state == JobState.SUBMIT_UNKNOWN else 1 <= attempt <= last


def adopt_earlier_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``submit_unknown``/``retry_wait``/``pending``/``submitting`` → ``queued``: fal's signed
    webhook proves that it ran and finished (so billed) ``attempt``, an earlier submit of the job
    whose answer was lost, while the job has no live request of its own
    (:func:`earlier_proof_adoptable`): ``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` sent it again,
    and that resend's answer was lost too, or failed, or it waits to send again (keeping, maybe,
    the id of a resend fal accepted and then ended without a video). The job keeps
    the proved request and its result (``fetched``, as :func:`adopt_late_proof`): nothing more is
    sent, and no paid video is dropped.

    The attempts are those sent (a resend claimed but not sent is not counted, as
    :func:`give_back` does), and no resend is pending any more. The money stays counted once:
    the proved attempt's estimate leaves ``ambiguous_usd`` ("possibly billed"; the request is
    the job's own now, billed when it ends). A later attempt whose outcome is unknown stays a
    *possible* duplicate charge: from ``submit_unknown`` its estimate moves into
    ``ambiguous_usd``, as any exit of that state without proof does (a simulation's excepted,
    never at a provider that bills); its own proof, if it comes, is a confirmed duplicate charge.
    A resend claimed by a submit step loses its lease, and its send (fenced by version) finds the
    job moved. The row is locked first. False when the job does not qualify or moved on
    (compare-and-set on ``fence``).
    """
    if fence.state not in _EARLIER_PROOF_STATES:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or not earlier_proof_adoptable(found, attempt):
        return False
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    if fence.state == JobState.SUBMIT_UNKNOWN:
        simulated = session.scalar(select(Batch.simulated).where(Batch.id == found.batch_id))
        if not simulated:
            adopted["ambiguous_usd"] += found.est_usd
    return _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        attempts=sent_attempts(found),
        resend_attempt=None,
        **adopted,
        **fetched,
    )


def restored_proof_adoptable(job: Any, attempt: int) -> bool:
    """Whether a proof of ``job``'s ``attempt`` (a :class:`~jobs.models.Job` or a row of its
    columns) shows the database is behind fal: ``attempt`` is one the database never recorded
    as sent (greater than :func:`sent_attempts`), yet the delivery's token holds for it, and
    a token is only ever minted for a submit about to be recorded as sent. Only a database
    restored from an older backup (or a copy of one) gets there: the submit that sent the
    attempt was recorded in the database as it was later, which the backup does not hold.

    Only a job with no request of its own that this database would send (again) qualifies:
    ``pending``, ``retry_wait`` or ``submitting`` before its POST is recorded as sent (a
    dispatcher claimed it right now: its send, fenced by version, then finds the job moved),
    no output. A request id it keeps is an ended one's (:func:`earlier_proof_adoptable`).
    ``submitting`` with its POST recorded, ``submit_unknown`` and every later state are left
    to the other cases: a request of theirs may be live at fal."""
    state = JobState(job.state)
    if state not in _RESEND_WAITS or job.output_path is not None:
        return False
    if state == JobState.SUBMITTING and job.submitted_input is not None:
        return False  # its POST is out: the proof of its attempt is that POST's, or a duplicate
    return attempt > sent_attempts(job)


def adopt_restored_proof(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    submitted_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``pending``/``retry_wait``/``submitting`` → ``queued``: fal's signed webhook, its token
    valid for ``attempt``, proves that fal accepted ``attempt`` as ``request_id``, an attempt
    this database never recorded as sent (:func:`restored_proof_adoptable`): the database was
    restored from a backup older than the submit. The job keeps the proved request and goes on as
    any adopted request does (polled, its video fetched; ``fetched``: what a success's webhook
    carries of fal's result): it is never sent again, so nothing is paid twice.

    The attempts catch up with fal's (``attempt``), ``submitted_at`` and ``sent_at`` become
    ``submitted_at`` (when the proof came: the send itself was recorded only in the database as
    it was later), no resend is pending any more. A resend of an unknown submit that was pending
    in the backup (``resend_attempt``) went out if ``attempt`` is it or later: counted as a
    possible duplicate charge, as its send would have been (:func:`record_send`); the earlier
    attempt's "possibly billed" estimate stays. A submit step that claimed the job loses its
    lease, and its send (fenced by version) finds the job moved and sends nothing. The row is
    locked first. False when the job does not qualify or moved on (compare-and-set on
    ``fence``)."""
    if fence.state not in _RESEND_WAITS:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or not restored_proof_adoptable(found, attempt):
        return False
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    adopted["ambiguous_usd"] = found.ambiguous_usd  # no unknown submit of this database is proved
    if found.resend_attempt is not None and attempt >= found.resend_attempt:
        adopted["possible_duplicate_charges"] = found.possible_duplicate_charges + 1
    return _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        attempts=attempt,
        resend_attempt=None,
        submitted_at=submitted_at,
        sent_at=submitted_at,
        **adopted,
        **fetched,
    )


def unknown_cancel_adoptable(session: Session, job: Any, attempt: int) -> bool:
    """Whether ``job`` (a :class:`~jobs.models.Job` or a row of its columns) ended ``cancelled``
    (``wanbatch cancel``, the dashboard's, a deadline, a budget) while ``attempt``'s request was
    the only one it had sent and not ended: its outcome unknown (from ``submit_unknown``, its
    POST's answer lost: ``attempt`` is that POST's, the job's last), or a resend of it decided
    but not sent (``retry_wait``, ``pending``, ``submitting`` before its POST was recorded as
    sent: :func:`resend_unsent` as it was then). No request kept, no output. The cancel sent
    nothing, and nothing was sent since (a cancelled job sends nothing): a proof that fal
    accepted ``attempt`` (a success's webhook, the submit's late answer) is then of the job's
    one request, adopted (:func:`adopt_unknown_cancelled`), not a duplicate charge. A proof of
    an earlier attempt, a resend of which went out, is one of two requests: a duplicate.

    The state the cancel came from is its move into ``cancelled`` (:func:`_into_cancelled`)."""
    if JobState(job.state) != JobState.CANCELLED or job.request_id is not None or job.output_path is not None:
        return False
    event = _into_cancelled(session, job.id)
    if event is None or event.from_state is None:
        return False
    came_from = JobState(event.from_state)
    if came_from == JobState.SUBMIT_UNKNOWN:
        return bool(attempt >= 1 and job.attempts == attempt)
    return _resend_unsent_in(came_from, job, attempt)


def adopt_unknown_cancelled(
    session: Session,
    fence: Fence,
    *,
    request_id: str,
    gateway_request_id: str | None,
    attempt: int,
    next_poll_at: datetime,
    reason: str,
    **fetched: Any,
) -> bool:
    """``cancelled`` → ``queued``: proof that fal accepted ``attempt`` as ``request_id`` comes
    after a cancel ended the job while that request was its only one, its outcome unknown
    (:func:`unknown_cancel_adoptable`): fal's signed webhook (it ran the request to the end:
    billed in full) or the submit's late answer once fal ran it anyway (a cancel of it did not
    stop it). The job keeps that request and goes on as any adopted request does, its video
    fetched (``fetched``: what a webhook carries of fal's result, :func:`adopt_late_proof`), and
    billed once, as the success it is. Its batch stays cancelled: nothing is sent.

    The attempts are those sent (``attempt``), no resend is pending any more. The money stays
    counted once: the estimate the unknown submit put in ``ambiguous_usd`` ("possibly billed")
    leaves it — the request is the job's own now, billed in full when its download ends — and
    the job's share of its batch's finished money is taken back (it is in flight again). The
    row is locked first. False when the job does not qualify or moved on (compare-and-set on
    ``fence``).
    """
    if fence.state != JobState.CANCELLED:
        return False
    found = _locked_unmoved(session, fence)
    if found is None or not unknown_cancel_adoptable(session, found, attempt):
        return False
    # Before any write: a request another job holds is refused with nothing done (a rerun
    # cancelled below for a request the job then does not keep would never be sent).
    refuse_held_request(session, found.id, request_id)
    before = finished_usd(JobState.CANCELLED, found.actual_usd, found.est_usd, found.ambiguous_usd)
    adopted = _proved_request(found, request_id, gateway_request_id, next_poll_at)
    reason = _settle_repeats(session, found, request_id, reason, adopted)
    moved = _move(
        session,
        fence,
        JobState.QUEUED,
        reason,
        attempts=attempt,
        resend_attempt=None,
        finished_at=None,
        download_attempts=0,
        **adopted,
        **fetched,
    )
    if moved:
        _add_finished(session, found.batch_id, found.submitted_at, -before)
    return moved
