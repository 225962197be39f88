"""Schedules: keep each batch's sending inside its window and before its deadline.

A batch's ``schedule`` (manifest; :class:`jobs.schedule.Schedule`) says when its jobs may be
*sent*; dispatch claims nothing of a batch while it is closed (or paused by its user). This
step, run every tick, handles the moments it closes:

* **Past the deadline** nothing will ever be sent again: jobs never sent end ``cancelled`` with
  reason ``deadline`` (one set-based statement per state), and requests still waiting in fal's
  queue are cancelled there (free while queued). Requests already running finish and are
  downloaded: they are paid for. fal itself never starts a request after the cut-off either,
  as every submit carried ``X-Fal-Request-Start-Timeout`` (:mod:`worker.steps.submit`).
* **At a window's end** requests still waiting in fal's queue are cancelled there and their
  jobs go back to ``pending`` for the next window, no attempt counted; running ones finish.
  fal's cancel of a running request is best effort: should its signed webhook then prove that
  it ran such a request to the end (billed), the job takes that request back and its video
  instead of sending it again (:func:`jobs.store.adopt_window_proof`); a job already sent
  again counts it as a confirmed duplicate charge (:func:`jobs.store.note_window_duplicate`).

A cancel is only asked of requests we believe are still ``queued``: cancelling a running one
would throw away work fal bills anyway.

The cancel is sent first, then the job's ``queued`` → ``cancelling`` is stored. fal's answer
(``client_cancelled``) may be heard in between, by a status stream or a poll, or the job may
have been seen ``running`` meanwhile (fal had started it), so that the move finds it moved: a
``client_cancelled`` end of a ``queued``/``running`` job whose batch's schedule has closed
(:func:`closed_by`) is read as this cancel's answer, as a ``cancelling`` job's is, and settled
the same way — never as a failed request to download.

fal usually gets there first: the start timeout every such submit carried ends at the window's
end (or the deadline), so fal itself ends the requests still in its queue then, as
``request_timeout`` — never started, not billed. That is the same event as our cancel, seen from
fal's side, and it is settled the same way: whichever fal reports (our cancel, its timeout), the
job of a request that ended unstarted at a window's end or deadline moves in one place,
:func:`end_unstarted`, called by the status handling that sees it
(:func:`worker.steps.poll.record_completion`, for polls, status streams and webhooks alike).
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy.orm import Session

from jobs import billing, db, store
from jobs.errors import ProviderError
from jobs.models import Batch, BatchState, Job, utcnow
from jobs.schedule import Schedule
from jobs.store import Fence
from worker.fal.models import RequestHandle, Status
from worker.steps.cancels import CancelRound, in_lane
from worker.steps.context import Runtime, S, handle_of, tail_of_fal_queue_first
from worker.steps.failures import billed

log = logging.getLogger(__name__)

#: ``error_type`` of a job whose queued request is being cancelled because its batch's window
#: closed (it goes back to ``pending``) or its deadline passed (it ends ``cancelled``).
WINDOW_CLOSED = "window_closed"
DEADLINE = "deadline"

#: fal's ``error_type`` for a request whose start timeout (``X-Fal-Request-Start-Timeout``)
#: passed while it waited in the queue (504, ``X-Fal-Request-Timeout-Type: user``).
START_TIMED_OUT = "request_timeout"


def closed_by(schedule: Schedule, now: datetime) -> str | None:
    """Why the schedule has closed on what its batch sent at ``now``: :data:`DEADLINE` (passed),
    :data:`WINDOW_CLOSED` (outside the window, or nothing opens before the deadline any more), or
    None — open, or not started yet (before ``not_before`` nothing of it can be at fal).

    What :func:`enforce_schedules` cancels requests for, and so also how a cancel's answer that
    comes before the job's own move to ``cancelling`` is read
    (:func:`worker.steps.poll.record_completion`)."""
    if schedule.is_open(now):
        return None
    if schedule.past_deadline(now):
        return DEADLINE
    if schedule.not_before is not None and now < schedule.not_before:
        return None
    return WINDOW_CLOSED


def never_opens_words(schedule: Schedule) -> str:
    """Why a schedule whose deadline has not come yet will send nothing more, for the error of
    the jobs it ends early (:func:`enforce_schedules`): its last window has closed and none opens
    before the deadline (or, without a window, ``not_before`` is not before the deadline)."""
    if schedule.window is None:
        return "not_before is not before it"
    window = schedule.as_json()["window"]
    return f"the last window ({window} {schedule.timezone}) closed and none opens before it"


def enforce_schedules(rt: Runtime, now: datetime | None = None) -> int:
    """Apply every scheduled batch's deadline and window end; returns how many jobs it moved.

    The ``queued`` requests of the batches it closes are cancelled newest first, from the tail
    of fal's FIFO queue (:func:`~worker.steps.context.tail_of_fal_queue_first`): our ``queued``
    lags fal, and cancelling one that in fact runs frees a slot into which fal starts the
    request at the head of its queue — if that were ours, still to be cancelled, it would be
    cancelled while running, and billed. They go off the conductor's loop, in that order,
    within a bound (:mod:`worker.steps.cancels`): one fal does not answer in time is sent again
    next tick, and the tick goes on.
    """
    now = now or utcnow()
    moved = 0
    plan: list[tuple[Fence, RequestHandle, str]] = []
    closing: list[tuple[Job, str]] = []
    # Only a look first (every tick, nearly always finding nothing): no write lock for nothing.
    # Whatever it finds is decided again below, in the transaction that acts; a batch that
    # closes after the look is found by the next tick, as one closing after the transaction was.
    with db.read_scope(rt.engine) as session:
        if not any(_acts_on(rt, batch, now) for batch in store.scheduled_batches(session)):
            return 0
    with db.session_scope(rt.engine) as session:
        for batch in store.scheduled_batches(session):
            if not _acts_on(rt, batch, now):
                continue
            schedule = store.batch_schedule(batch)
            why = closed_by(schedule, now)
            if schedule.deadline is not None and schedule.over(now) is not None:
                # Past the deadline, or no window opens before it any more: nothing will ever
                # be sent, so the unsent jobs end now, as the deadline would end them (waiting
                # for it would only keep the batch unfinished until then).
                deadline = f"the batch's deadline ({schedule.stamp(schedule.deadline)})"
                if not schedule.past_deadline(now):
                    deadline += f": {never_opens_words(schedule)}"
                moved += store.cancel_unsent_jobs(
                    session,
                    [batch.id],
                    reason="deadline",
                    error=f"not sent before {deadline}",
                    error_type=DEADLINE,
                    worker=rt.owner,
                    # A job sent before: what ended its request, then this.
                    sent_error=f"not sent again before {deadline}",
                )
            if why is None:  # before not_before, which the deadline comes first: nothing at fal
                continue
            reach = rt.reach(session)  # a request sent to another fal queue is its processes' to cancel
            closing.extend(
                (job, why)
                for job in store.jobs_of_batch(session, batch.id, states=[S.QUEUED])
                if reach.holds(job)
            )
        whys = {job.id: why for job, why in closing}
        for job in tail_of_fal_queue_first(job for job, _why in closing):
            plan.append((rt.fence(job), handle_of(job, rt.settings.fal_queue_url), whys[job.id]))
    if plan:
        moved += in_lane(rt, "schedule", lambda round_: _cancel_closing(rt, round_, plan)) or 0
    return moved


def _acts_on(rt: Runtime, batch: Batch, now: datetime) -> bool:
    """Whether :func:`enforce_schedules` has anything to do about ``batch`` at ``now``: an active
    batch of this runtime's scope and provider past its deadline or outside its window."""
    if batch.state != BatchState.ACTIVE or not rt.in_scope(batch.id):
        return False
    if batch.simulated != rt.simulated:  # its requests are another provider's (Runtime.reach)
        return False
    schedule = store.batch_schedule(batch)
    return closed_by(schedule, now) is not None or schedule.over(now) is not None


def _cancel_closing(rt: Runtime, round_: CancelRound, plan: list[tuple[Fence, RequestHandle, str]]) -> int:
    """Cancel the queued requests of ``plan`` at fal, in its order, on the cancels' own thread
    within ``round_``'s deadline (:mod:`worker.steps.cancels`); how many jobs moved to
    ``cancelling``. One refused, or not answered in time, is sent again next tick."""
    moved = 0
    for fence, handle, why in plan:
        try:
            outcome = round_.send(handle)
        except ProviderError as exc:
            log.info(
                "job %s: cancel at the %s failed (%s); will try again",
                fence.job_id,
                why,
                exc,
                extra={
                    "event": "schedule.cancel_failed",
                    "job_id": fence.job_id,
                    "request_id": handle.request_id,
                },
            )
            continue
        if outcome is None:  # not answered within the bound: not known yet, sent again next tick
            continue
        with db.session_scope(rt.engine) as session:
            reason = "deadline passed" if why == DEADLINE else "window closed"
            moved += store.mark_cancelling(
                session, fence, reason=f"{reason}: cancel requested at fal: {outcome.value}", error_type=why
            )
    return moved


# ------------------------------------------------------------------ requests fal ended unstarted


def timed_out_unstarted(status: Status) -> bool:
    """Whether ``status`` is fal ending a request whose start timeout passed before it started:
    COMPLETED with ``request_timeout`` and no inference time reported (nothing ran, so nothing
    is billed). A ``request_timeout`` *with* inference time is a run that took too long: an
    ordinary failure, not this."""
    return status.completed and status.error_type == START_TIMED_OUT and not billing.ran(status.metrics)


def start_timeout_expired(session: Session, fence: Fence, status: Status, *, now: datetime) -> bool:
    """fal ended the ``queued`` request of ``fence`` by the start timeout its submit carried
    (:func:`timed_out_unstarted`): settle it as the window's end or the deadline, where that
    timeout came from. False (nothing done) when its submit carried no start timeout.

    Whether it carried one is what the submit recorded (``Job.start_timeout_at``), not the
    batch's schedule now: a schedule removed or changed while the request waited at fal does not
    make fal's timeout of it a failure that counts an attempt. (With none recorded, the batch's
    schedule now still decides: a job sent before schema 0030 recorded it.)

    Where the schedule stands at ``now`` decides, as for our own cancel:

    * past the deadline: ``cancelled`` with reason ``deadline``, as :func:`enforce_schedules`
      would have done had its cancel come first;
    * the window closed: back to ``pending`` for the next window, no attempt counted;
    * still open here (our clock behind fal's, a schedule changed or removed since the
      submit): nothing ran and nothing was billed, so no attempt is counted either — back to
      ``pending``, due at once. The next submit carries the time then left in the window as
      its start timeout (or is held back for the next window when under a second is left), so
      the round is bounded by this clock reaching the window's end.

    A submit of a batch without a window or deadline carries no start timeout
    (``worker.steps.submit``): a ``request_timeout`` of it is fal's own failure and takes the
    usual retry path.
    """
    job = store.get_job(session, fence.job_id)
    schedule = store.batch_schedule(store.get_batch(session, job.batch_id))
    if job.start_timeout_at is None and schedule.window is None and schedule.deadline is None:
        # Recorded as carrying none, or sent before schema 0030 by a batch that has no window
        # or deadline now either: fal's own failure.
        return False
    if schedule.past_deadline(now):
        why: str | None = DEADLINE
    elif not schedule.is_open(now):
        why = WINDOW_CLOSED
    else:
        why = None
    ended = f"fal timed it out in its queue before it started ({status.error_type})"
    end_unstarted(session, fence, job, status, why=why, how=ended, now=now, timed_out=True)
    return True


def end_unstarted(
    session: Session,
    fence: Fence,
    job: Job,
    status: Status,
    *,
    why: str | None,
    how: str,
    now: datetime,
    outcome: billing.Outcome = billing.Outcome.CANCELLED_IN_QUEUE,
    timed_out: bool = False,
) -> bool:
    """Move the job whose request fal ended at the batch's window end (``why`` ``window_closed``)
    or deadline (``deadline``) — cancelled at our request (the job ``cancelling``, or still
    ``queued``/``running`` when fal's answer came first), or timed out by the start timeout it
    carried — the one place both go through. ``how``: what fal did, for the event's reason;
    ``outcome``: how it is billed (a cancel may have reached it running). ``timed_out``: fal
    ended it by the start timeout (:func:`start_timeout_expired`), not at our request, which
    the job's error says (wanbatch cancelled nothing).

    The deadline: ``cancelled`` for good (reason ``deadline``). A window's end: back to
    ``pending``, the attempt not counted against ``WANBATCH_MAX_ATTEMPTS`` when it never ran
    (or to ``retry_wait``, the attempt counted and billed, when fal had started it), for the
    next window; the job keeps its request id and ``submitted_at`` (it was sent) and says what
    ended the request as its error. ``why`` None: the schedule is open (see
    :func:`start_timeout_expired`): ``pending``, due at once.
    """
    cost = billed(job, outcome)
    if why == DEADLINE:
        return store.mark_cancelled(
            session,
            fence,
            reason=f"deadline: {how}",
            error=(
                "fal timed it out in its queue at the batch's deadline, before it started (not billed)"
                if timed_out
                else "cancelled in fal's queue at the batch's deadline"
                if outcome == billing.Outcome.CANCELLED_IN_QUEUE
                else "cancelled at the batch's deadline while running at fal"
            ),
            error_type=DEADLINE,
            completed_at=now,
            provider_metrics=status.metrics or None,
            details={store.CANCEL_BILLED_AS: outcome.value},  # taken back should fal prove a run
            **cost,
        )
    if why == WINDOW_CLOSED:
        error = f"window closed: {how}"
        reason = f"{error}; sent again in the next window"
    else:
        error = f"{how} though the batch's schedule was open here"
        reason = f"{how} though the batch's schedule is open here: not counted, sent again"
    return store.requeue_after_cancel(
        session,
        fence,
        reason=reason,
        billed=outcome != billing.Outcome.CANCELLED_IN_QUEUE,
        error=error,
        error_type=why,
        details={store.CANCEL_BILLED_AS: outcome.value},  # taken back should fal prove a run
        **cost,
    )
