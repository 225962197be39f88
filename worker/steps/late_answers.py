"""fal's acceptance of a submit whose job has moved on: the proof of a request the job does not keep.

A POST's answer can come after its job was settled without it: the worker stalled past its
lease while the POST was in flight (a live one renews it: :mod:`worker.steps.keepalive`), the
reconciler called the outcome unknown, and the policy failed the job or sent it again. A
journal of accepted submits (:mod:`worker.steps.unrecorded`) can likewise be read after its job
moved on. fal has that request and bills it once it runs; dropping the proof lost a paid video
without a trace, and ``rerun --failed-only`` then paid for it again.

A job still in ``submit_unknown`` adopts the answer, by the compare-and-set edges
``submit_unknown`` → ``queued``/``running`` (:func:`worker.steps.submit._record_submission`).
So, here (:func:`settle_late_answer`), does a job for which that request is still the one to
keep — nothing paid twice, no paid video lost:

* a job that failed only for its unknown submit outcome (``error_type`` ``submit_unknown``, the
  answer is to its last attempt, no request kept, no output): ``failed`` → ``queued``
  (:func:`jobs.store.adopt_late_proof`), as a webhook's late proof does;
* a job whose resend of that attempt (``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit``) has not gone
  out yet (``retry_wait``, ``pending``, or ``submitting`` before its POST is recorded as sent):
  ``queued`` with the proved request (:func:`jobs.store.adopt_before_resend`), never resent;
* a job a cancel ended (``wanbatch cancel``, a deadline, a budget) while that request was its
  only one, its outcome unknown (from ``submit_unknown``, or its resend not sent yet:
  :func:`jobs.store.unknown_cancel_adoptable`): ``cancelled`` → ``queued``
  (:func:`jobs.store.adopt_unknown_cancelled`), once fal ran it anyway (below).

The adopted request is then polled (or streamed) and its video fetched like any other; fal bills
it once, and the money is counted once.

A failed or cancelled job (``rerun --failed-only`` repeats both) whose rerun (a job of another
batch) was sent meanwhile
(:func:`jobs.store.sent_repeat`) would have fal render and bill the same input twice: its late
request is cancelled at fal first (free while it waits in fal's queue: then nothing is paid
twice, and it is only put on the history); when fal ran it anyway (billed), the job keeps it and
its video and counts a confirmed duplicate charge (:func:`jobs.store.adopt_late_proof`); when
it was cancelled while running (billed, no video), it is booked as one below. A rerun not sent
yet when the job keeps its late request is cancelled before its POST
(:func:`jobs.store.adopt_late_proof`): the input is paid once.

A late answer proves acceptance, not completion: when the job's batch no longer sends —
cancelled, or past its deadline — the request is cancelled at fal first (free while it waits in
fal's queue, which is what the user asked for), and adopted only when fal ran it anyway (already
finished, or the cancel did not go through): that one is billed, so its video is kept, as a
request that finished despite a cancel always is. (A job that was cancelled itself stops sending
too.) One the cancel did stop is the job's own request all the same, never a duplicate charge:
put on its history, and billed as fal bills the cancel (:func:`jobs.store.note_own_request`:
nothing while it waited in fal's queue, in full once it ran), what its submit may have cost no
longer "possibly billed".

Any other (a job sent again whose resend went out, a job cancelled or finished otherwise, an
earlier attempt's request) is not adopted — a terminal job leaves its state only as above, and
a job sent again keeps the request of its new attempt — and is:

* cancelled at fal — free while it waits in fal's queue, so usually nothing is billed: what its
  submit may have cost then leaves "possibly billed" (``note_request`` ``unbilled``);
* recorded on the job's history (:func:`jobs.store.note_request`: "accepted as <id>", so the
  request is known and a webhook for it is not counted again);
* a confirmed duplicate charge when fal bills it all the same (it was already running when
  accepted, fal had already finished it, or the cancel did not go through), in the job's books
  as one a signed webhook proves (:func:`jobs.store.note_duplicate_charge`): counted in
  ``confirmed_duplicate_charges`` and billed at the job's estimate (fal's answer carries no
  cost) in its actual cost — and in wasted, for the job keeps no output of it — while what its
  submit may have cost leaves "possibly billed". Once, however often it is observed.

While a worker holds the job (a resend's POST, a download) the bill cannot be written (that
worker bills the job from what it read when it took the lease): the request is then put on the
history and counted as before, its money left "possibly billed", where its unknown submit put it.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, Literal

from sqlalchemy.orm import Session

from jobs import billing, db, store
from jobs.errors import NotFoundError, RequestHeldError, WanbatchError
from jobs.models import BatchState, Job, utcnow
from worker.fal.models import CancelOutcome, RequestHandle
from worker.steps.context import Runtime, S
from worker.steps.poll import first_poll_at
from worker.steps.unrecorded import Accepted

log = logging.getLogger(__name__)

#: What :func:`settle_late_answer` did: the job keeps the request (``adopted``); it is counted as
#: a confirmed duplicate charge (``billed``); only put on the history (``noted``); nothing, the
#: request being known already or the job gone (``known``); or nothing but a note, another job
#: of the same fal queue holding the request (``held``: a provider protocol error).
Settled = Literal["adopted", "billed", "noted", "known", "held"]
#: Reads of a job that moves under an adoption's compare-and-set before giving up on it.
_TRIES = 3
#: The ends ``rerun --failed-only`` repeats (:func:`jobs.rerun.rerun_batch`): a late answer of
#: such a job may meet a rerun already sent (:func:`jobs.store.sent_repeat`).
_REPEATED = frozenset({S.FAILED, S.CANCELLED})


def awaits_answer(job: Job, attempt: int) -> bool:
    """Whether ``job`` still waits for the answer to its POST of ``attempt``, whoever holds it
    now: its outcome declared unknown and nothing proved yet (an answer to an earlier attempt
    proves a request of the job too; the later attempt's is then the possible duplicate), or
    that very POST still recorded as in flight."""
    if job.request_id is not None:
        return False
    if job.state == S.SUBMIT_UNKNOWN:
        return True
    return job.state == S.SUBMITTING and job.attempts == attempt and job.submitted_input is not None


def adoptable(session: Session, job: Job, attempt: int) -> bool:
    """Whether ``attempt``'s request, proved by its late answer, is still the one ``job`` is to
    keep: the job failed only for that attempt's unknown outcome, its resend of it has not
    gone out, or a cancel ended it while that request was its only one
    (:func:`jobs.store.unknown_cancel_adoptable`; see the module's docstring)."""
    return (
        store.resend_unsent(job, attempt)
        or (
            job.state == S.FAILED
            and job.error_type == store.SUBMIT_UNKNOWN_ERROR
            and job.attempts == attempt
            and job.request_id is None
            and job.output_path is None
        )
        or store.unknown_cancel_adoptable(session, job, attempt)
    )


def settle_late_answer(
    rt: Runtime, accepted: Accepted, endpoint: str, *, cancel: bool = True, event: str = "submit.orphaned"
) -> Settled:
    """Settle ``accepted``, a request whose answer came after its job moved on: adopt it when
    the job is still to keep it (:func:`adoptable`; only a request of this runtime's provider,
    ``cancel``); else cancel it at fal (unless ``cancel`` is False: another provider's request),
    put it on its job's history and, when billed, count and bill it; say so in a warning
    (``event``). What was done (:data:`Settled`).

    Nothing is done twice: a request already on the job's history (a journal read again, a
    webhook's proof) is left as it is, and one a webhook already counted is not counted again.

    A request another job of the same fal queue holds (:func:`jobs.store.request_holder`) is
    that job's, never this one's: a provider protocol error. It is neither adopted, nor
    cancelled at fal, nor billed to this job; the clash goes on the job's history and in an
    error line (``held``).
    """
    try:
        return _settle(rt, accepted, endpoint, cancel=cancel, event=event)
    except RequestHeldError as held:  # raised before anything was written or sent
        _note_held(rt, accepted, held)
        return "held"


def _note_held(rt: Runtime, accepted: Accepted, held: RequestHeldError) -> None:
    """Say that ``accepted`` names a request another job holds: an error line and a note on the
    job's history (:func:`jobs.store.note_held_request`), its state and money untouched."""
    reason = (
        f"late answer to attempt {accepted.attempt}: fal answered with request id {held.request_id}, "
        f"which job {held.holder} already holds (a provider protocol error): not taken, not cancelled"
    )
    with db.session_scope(rt.engine) as session:
        store.note_held_request(session, accepted.job_id, reason=reason, worker=rt.owner)
    log.error(
        "job %s: fal's late answer names request id %s, already job %s's; not taken",
        accepted.job_id,
        held.request_id,
        held.holder,
        extra={
            "event": "submit.duplicate_request",
            "job_id": accepted.job_id,
            "request_id": held.request_id,
            "holder": held.holder,
        },
    )


def _settle(rt: Runtime, accepted: Accepted, endpoint: str, *, cancel: bool, event: str) -> Settled:
    """:func:`settle_late_answer`, which handles a request another job holds."""
    with db.read_scope(rt.engine) as session:
        if store.request_known(session, accepted.job_id, accepted.request_id):
            return "known"
        try:
            job = store.get_job(session, accepted.job_id)
        except NotFoundError:
            return "known"
        # Before anything is sent (a cancel at fal) or written: another job's request is not this one's.
        store.refuse_held_request(session, job.id, accepted.request_id)
        keep = cancel and adoptable(session, job, accepted.attempt)
        stopped = keep and _stops_sending(session, job)
        # ``rerun --failed-only`` sent the failed or cancelled job again (it repeats both; another
        # batch's job, billed there): this request would render and bill the same input twice —
        # cancelled first, kept (and counted as a confirmed duplicate charge) only when fal ran
        # it anyway, and counted as one when the cancel stopped it running (billed, no video).
        rerun = store.sent_repeat(session, job) if keep and job.state in _REPEATED else None
    if keep and not stopped and rerun is None and _adopt(rt, accepted, "fal accepted it"):
        return "adopted"
    if cancel:
        fate, outcome = _cancel(rt, accepted, endpoint)
    else:
        fate, outcome = (
            "not cancelled (another provider's request): it runs, and is billed",
            billing.Outcome.SUCCEEDED,
        )
    ran = outcome == billing.Outcome.SUCCEEDED  # fal ran it anyway (billed): its video is kept
    if stopped and ran and _adopt(rt, accepted, f"its batch stops sending; {fate}"):
        return "adopted"
    if rerun is not None and ran and _adopt(rt, accepted, f"its rerun, job {rerun}, was sent; {fate}"):
        return "adopted"
    if rerun is not None:
        fate = f"its rerun, job {rerun}, was sent; {fate}"
    reason = (
        f"late answer to attempt {accepted.attempt}, after the job had moved on: "
        f"accepted as {accepted.request_id}; {fate}"
    )
    with db.session_scope(rt.engine) as session:
        # Beside a sent rerun, a request the cancel stopped while it ran is billed as well as the
        # rerun's: the input paid twice, a confirmed duplicate charge (not the job's own one).
        booked = _book(session, rt, accepted, reason, outcome, own=keep and rerun is None)
        if booked is None:
            return "known"
        state = store.get_job(session, accepted.job_id).state.value
    log.warning(
        "fal accepted %s but the job moved on (%s): %s%s",
        accepted.line(),
        state,
        fate,
        booked,
        extra={"event": event, "job_id": accepted.job_id, "request_id": accepted.request_id},
    )
    return "billed" if booked else "noted"


def _stops_sending(session: Session, job: Job) -> bool:
    """Whether ``job`` sends nothing any more: it was cancelled (a cancel, a deadline, a budget),
    or its batch was, or is past its deadline. A request it did not keep is then cancelled at
    fal before anything else (:func:`settle_late_answer`)."""
    if job.state == S.CANCELLED:
        return True
    batch = store.get_batch(session, job.batch_id)
    return batch.state == BatchState.CANCELLED or store.batch_schedule(batch).past_deadline(utcnow())


def _adopt(rt: Runtime, accepted: Accepted, fate: str) -> bool:
    """The job keeps ``accepted`` (:func:`adoptable`): ``failed`` → ``queued``
    (:func:`jobs.store.adopt_late_proof`) or the pending resend dropped
    (:func:`jobs.store.adopt_before_resend`), by compare-and-set, read again while the job moves
    under it. ``fate``: what became of the request, for the history. False when the job no
    longer keeps it (its resend went out meanwhile, say)."""
    for _ in range(_TRIES):
        with db.session_scope(rt.engine) as session:
            job = store.get_job(session, accepted.job_id)
            if not adoptable(session, job, accepted.attempt):
                return False
            common: dict[str, Any] = {
                "request_id": accepted.request_id,
                "gateway_request_id": accepted.gateway_request_id,
                "attempt": accepted.attempt,
                "next_poll_at": first_poll_at(rt.settings, utcnow()),
            }
            if job.state == S.CANCELLED:
                what = "after the job was cancelled with its submit's outcome unknown"
                done = "it is followed and its video fetched, nothing is sent"
                moved = store.adopt_unknown_cancelled(
                    session,
                    rt.fence(job),
                    reason=f"late proof by the submit's answer, {what}: attempt {accepted.attempt} "
                    f"accepted as {accepted.request_id}; {fate}: {done}",
                    **common,
                )
            elif job.state == S.FAILED:
                what = "after the job failed for its unknown submit outcome"
                done = "it is followed and its video fetched, nothing is sent again"
                moved = store.adopt_late_proof(
                    session,
                    rt.fence(job),
                    reason=f"late proof by the submit's answer, {what}: attempt {accepted.attempt} "
                    f"accepted as {accepted.request_id}; {fate}: {done}",
                    **common,
                )
            else:
                what = "before the resend went out"
                done = "the resend is dropped, nothing is sent again"
                moved = store.adopt_before_resend(
                    session,
                    rt.fence(job),
                    reason=f"late answer, {what}: attempt {accepted.attempt} accepted as "
                    f"{accepted.request_id}; {fate}: {done}",
                    **common,
                )
            if moved:
                extra = {
                    "event": "submit.adopted_late",
                    "job_id": accepted.job_id,
                    "batch_id": job.batch_id,
                    "request_id": accepted.request_id,
                }
                said = "fal accepted %s, %s: the job keeps it (%s)"
                # Said once committed: a commit the database refuses (its disk is full) keeps nothing.
                db.after_commit(session, partial(log.warning, said, accepted.line(), what, done, extra=extra))
                return True
    return False


def _book(
    session: Session,
    rt: Runtime,
    accepted: Accepted,
    reason: str,
    outcome: billing.Outcome | None,
    *,
    own: bool = False,
) -> str | None:
    """Put ``accepted`` in its job's books: billed (``outcome``) as a confirmed duplicate charge,
    as a webhook's proof is (:func:`jobs.store.note_duplicate_charge`) — or, ``own`` (the job's
    one request, which the job kept but its cancel had fal stop: :func:`adoptable`), billed as
    its own, no duplicate (:func:`jobs.store.note_own_request`) — or only on the history, what
    its submit may have cost no longer "possibly billed" when fal bills it nothing. What was
    done, in words for the warning ("": noted only), or None when it was known already (or the
    job is gone): nothing done."""
    counted = store.duplicate_charge_recorded(session, accepted.request_id)  # billed by a webhook's
    if outcome is None or counted:
        noted = store.note_request(
            session,
            accepted.job_id,
            accepted.request_id,
            reason=reason,
            worker=rt.owner,
            billed=False,
            unbilled=not counted,  # fal's cancel answer: nothing billed
        )
        return "" if noted else None
    note = store.note_own_request if own else store.note_duplicate_charge
    booked = note(
        session,
        accepted.job_id,
        accepted.request_id,
        reason=reason,
        worker=rt.owner,
        outcome=outcome,
        now=utcnow(),
    )
    if booked == "counted":
        if own:
            return "; the job's only request, billed as fal bills its cancel, no duplicate charge"
        return "; counted as a confirmed duplicate charge, billed at the job's estimate"
    if booked != "held":
        return None
    if own:  # a worker bills the job from what it read: noted only, left possibly billed
        held = f"{reason}; its bill left possibly billed (a worker held the job)"
        noted = store.note_request(
            session, accepted.job_id, accepted.request_id, reason=held, worker=rt.owner, billed=False
        )
        return "; its bill left possibly billed (a worker held the job)" if noted else None
    # A worker holds the job and bills it from what it read (it would overwrite the bill): the
    # request is counted now, its money left "possibly billed", where its unknown submit put it.
    held = f"{reason}; counted, its bill left possibly billed (a worker held the job)"
    if not store.note_request(
        session, accepted.job_id, accepted.request_id, reason=held, worker=rt.owner, billed=True
    ):
        return None
    return "; counted as a confirmed duplicate charge, its bill left possibly billed (a worker held the job)"


def _cancel(rt: Runtime, accepted: Accepted, endpoint: str) -> tuple[str, billing.Outcome | None]:
    """Ask fal to cancel ``accepted``: what became of it, in words, and how fal bills it (None:
    not at all). fal's answer to a cancel says nothing of how a finished request ended: billed as
    a success, in full, as a request that runs on is."""
    # Built from the configured queue URL and the (validated) request id only: the key goes there.
    handle = RequestHandle.from_request_id(rt.settings.fal_queue_url, endpoint, accepted.request_id)
    try:
        outcome = rt.client.cancel(handle)
    except (WanbatchError, RuntimeError) as exc:  # refused, unreachable, or the client closed
        return f"could not be cancelled at fal ({exc}): it runs, and is billed", billing.Outcome.SUCCEEDED
    if outcome == CancelOutcome.ALREADY_COMPLETED:
        return "fal had already run it: billed", billing.Outcome.SUCCEEDED
    if outcome == CancelOutcome.NOT_FOUND:
        return "fal no longer knows it: not billed", None
    if accepted.running:
        return "cancelled at fal, but it was already running: billed", billing.Outcome.CANCELLED_RUNNING
    return "cancelled at fal while it waited in its queue: not billed", None
