"""Reconcile and cancel: drive jobs whose worker vanished (expired lease) or whose submit
outcome stayed unknown, and carry out ``wanbatch cancel`` at fal."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import NamedTuple

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.errors import (
    NotFoundError,
    ProviderError,
    RequestHeldError,
    RetryableProviderError,
)
from jobs.models import USER_CANCELLED, utcnow
from jobs.printable import one_line
from jobs.store import Fence
from worker.fal.models import CancelOutcome, RequestHandle
from worker.steps.cancel_tries import CancelTries
from worker.steps.cancels import CancelRound, in_lane
from worker.steps.context import DOWNLOAD_QUEUE, Runtime, S, handle_of, tail_of_fal_queue_first
from worker.steps.failures import (
    backoff,
    request_held_elsewhere,
    retry_after,
    settle_unknown_submit,
    submit_outcome_unknown,
    unknown_submit_wait_over,
)
from worker.steps.held import STALE_SECONDS as HELD_STALE_SECONDS
from worker.steps.late_answers import awaits_answer, settle_late_answer
from worker.steps.poll import first_poll_at
from worker.steps.unrecorded import (
    REFUSED_RETRY_SECONDS,
    Accepted,
    keep_only,
    passes_by_waiting,
    read_journal,
    refused_words,
)

log = logging.getLogger(__name__)


def reconcile(rt: Runtime, limit: int = 200) -> int:
    """Drive jobs whose worker vanished, or whose submission outcome stayed unknown too long.

    * ``submitting`` past its lease: if the POST never started (no recorded input, or this
      process knows its recorded send never went out: :mod:`worker.steps.unsent`) the job goes
      back to ``pending`` — safe to send; otherwise its outcome is unknown (``submit_unknown``).
      A live worker renews that lease while its POST is in flight (:mod:`worker.steps.keepalive`),
      so a lapsed one means the worker died or stalled; should its answer still come, the job
      keeps it or has it recorded (:mod:`worker.steps.late_answers`).
    * A simulation's (``--simulate``) is sent again instead, to this run's simulator: it was
      never at fal, so nothing was possibly billed (:func:`~worker.steps.failures.resend_to_simulator`).
    * ``submit_unknown`` past its deadline: the policy decides — fail with "submission outcome
      unknown", or resubmit as a new attempt counted as a possible duplicate charge. Without a
      webhook receiver nothing can prove the outcome, so there is no deadline to wait for: the
      policy is applied at once (:func:`~worker.steps.failures.submit_outcome_unknown`).

    With a batch scope (``rt.batch_ids``) the first is still done for every batch: it sends
    nothing, and a dead process's expired claims would otherwise hold the global outstanding cap.
    The second decides a batch's fate (fail it, or pay again), so only the scope's jobs get it.
    Neither touches another provider's jobs (:meth:`~worker.steps.context.Runtime.reach`): a
    simulation's are settled by its own ``--simulate`` run, a paid batch's by fal's runtimes.
    """
    moved = adopt_unrecorded(rt)  # first: a job whose request id is known is never "unknown"
    if rt.dead_leases is not None:  # a dead --simulate run's: claimed below at once, not after the lease
        rt.dead_leases.take_back()
    # Jobs whose accepted submission is held but not recorded (the database refused it), here
    # or by another live process (its mark renewed: worker.steps.held): never "unknown", never
    # sent again, until it is recorded — or until its holder is gone.
    held = rt.unrecorded.held_job_ids()
    now = utcnow()
    with db.session_scope(rt.engine) as session:
        held |= store.held_job_ids(session, live_since=now - timedelta(seconds=HELD_STALE_SECONDS))
        lease = rt.settings.lease_seconds
        reach = rt.reach(session)
        lost = store.claim_jobs(
            session,
            states=[S.SUBMITTING],
            limit=limit,
            now=now,
            owner=rt.owner,
            lease_seconds=lease,
            batch_ids=reach.batch_ids,
            exclude_ids=held,
            exclude_batch_ids=reach.exclude_batch_ids,
        )
        for job in lost:
            if job.submitted_input is None:
                ok = store.give_back(
                    session, rt.fence(job), reason="worker lost before sending; safe to send"
                )
            elif (unsent := rt.unsent.proof(job.id, job.sent_at)) is not None:
                # This process's POST of it never went out, and the give-back failed then.
                ok = store.give_back_not_sent(session, rt.fence(job), unsent.why)
                rt.unsent.forget(job.id)
            else:
                ok = submit_outcome_unknown(
                    session,
                    rt,
                    rt.fence(job),
                    "the worker was lost during the POST",
                    settle_now=rt.in_scope(job.batch_id),
                )
            moved += ok
        unknown = store.claim_jobs(
            session,
            states=[S.SUBMIT_UNKNOWN],
            limit=limit,
            now=now,
            owner=rt.owner,
            lease_seconds=lease,
            batch_ids=rt.batch_ids,
            exclude_ids=held,
            exclude_batch_ids=reach.exclude_batch_ids,
        )
        for job in unknown:
            moved += settle_unknown_submit(session, rt, job, unknown_submit_wait_over(rt.settings))
    return moved


def adopt_unrecorded(rt: Runtime) -> int:
    """Record the submissions fal accepted that the database could not take when they were
    made (:mod:`worker.steps.unrecorded`): those this process holds (its submit steps wait
    with them, or gave up on them), and,
    every :data:`~worker.steps.unrecorded.SCAN_SECONDS`, the journals that processes which
    have ended left for this database on this host. Run before the reconciler could declare
    such a job's outcome unknown (and, by its policy, fail it or pay for it again). A journal
    file is removed once every entry in it is settled. Returns how many jobs were recorded.

    Each entry is recorded in a unit of work of its own: one the database refuses (a
    constraint, a trigger, a bug: anything but an outage or a schema this process cannot work
    on, which end the round as ever) stays held — in memory and in its journal file, the others
    leaving it — said once in one line, tried again every
    :data:`~worker.steps.unrecorded.REFUSED_RETRY_SECONDS` (another process's at every look),
    and its job left alone by the reconciler meanwhile
    (:meth:`~worker.steps.unrecorded.Unrecorded.held_job_ids`). Before, one such entry failed
    every round of the conductor, with a traceback."""
    waiting = rt.unrecorded
    late: list[_Late] = []
    adopted = _retry_held(rt, late, wait=True)
    if waiting.scan_due():
        refused: list[Accepted] = []
        for path in waiting.journal.left_by_others():
            entries = read_journal(path)
            if entries is None:
                continue
            proof = f"kept in {path} while the database could not take it"
            kept = []
            for accepted in entries:
                got = _adopt_one(rt, accepted, proof, late, path)
                if got is None:
                    kept.append(accepted)
                else:
                    adopted += got
            refused.extend(kept)
            recorded = {e.job_id: e.request_id for e in entries if e not in kept}
            if recorded:  # the marks of a holder that ended, if it had made them
                rt.held.release(recorded)
            if kept:
                if len(kept) < len(entries):  # the others are settled: only these stay
                    keep_only(path, kept)
                continue
            try:
                path.unlink()
            except OSError as exc:  # another process settled it first, or the folder went read-only
                log.debug("could not remove %s: %s", path, exc, extra={"event": "reconcile.journal_left"})
        waiting.refused_elsewhere(refused)
    return adopted + _settle_late(rt, late)


def retry_held(rt: Runtime, *, wait: bool = True) -> int:
    """Record the submissions this process holds (:func:`adopt_unrecorded`'s first part), each
    when due: by the keeper of its marks (:mod:`worker.steps.held`) when its reconciler does
    not run (``wait`` False: nothing when the reconciler is at it). How many were recorded."""
    late: list[_Late] = []
    return _retry_held(rt, late, wait=wait) + _settle_late(rt, late)


def _retry_held(rt: Runtime, late: list[_Late], *, wait: bool) -> int:
    waiting = rt.unrecorded
    if not waiting.retrying.acquire(blocking=wait):
        return 0
    adopted = 0
    try:
        if wait:  # the reconciler's round: the keeper leaves the retries to it
            waiting.reconciled_at = time.monotonic()
        # Every one this process holds, also those a step still waits to record itself: this
        # runs once the database takes writes again, possibly before the step's next try — and
        # past the job's lease the claim below would otherwise declare its outcome unknown. The
        # step then finds its request id recorded (``_record_submission``).
        for accepted in waiting.waiting():
            if not waiting.retry_due(accepted):  # refused a moment ago
                continue
            got = _adopt_one(rt, accepted, "recorded late by the process that sent it", late)
            if got is not None:
                adopted += got
                waiting.recorded(accepted)
    finally:
        waiting.retrying.release()
    return adopted


def _settle_late(rt: Runtime, late: list[_Late]) -> int:
    """Settle the late answers found (after the transactions: a cancel is a call to fal), here
    on the caller, each before this returns; how many were adopted.

    Not on the cancels' thread (:func:`~worker.steps.cancels.in_lane`), which the tick stops
    waiting for: each entry's journal line and in-memory copy are gone by now
    (:func:`adopt_unrecorded`, :func:`_retry_held`), and nothing else sends its cancel, so a
    settlement left waiting behind a slow cancel sequence was lost when ``run`` ended — the
    request accepted (and billed) at fal, neither cancelled nor recorded. A late answer is
    rare; its cancel is bounded by the client's timeouts, as a submit step's own late answer
    (:mod:`worker.steps.submit`) has always been."""
    adopted = 0
    for accepted, endpoint, ours in late:
        # The job may keep it still (failed for its unknown outcome, its resend not sent yet).
        settled = settle_late_answer(rt, accepted, endpoint, cancel=ours, event="submit.adopt_too_late")
        adopted += settled == "adopted"
    return adopted


def _adopt_one(
    rt: Runtime, accepted: Accepted, proof: str, late: list[_Late], path: Path | None = None
) -> bool | None:
    """:func:`_adopt` in a unit of work of its own: whether it was recorded now, or None when
    the database refused it (said once; it stays held). An outage, a full disk, or a schema this
    process cannot work on raise, as they did: the conductor says so (and stops for the schema)."""
    found: list[_Late] = []
    try:
        with db.session_scope(rt.engine) as session:
            got = _adopt(session, rt, accepted, proof, found)
    except Exception as exc:
        if db.is_schema_missing(exc) or (
            db.is_schema_mismatch(exc) and (rt.schema_behind or db.schema_behind(rt.engine))
        ):
            raise
        if passes_by_waiting(exc):
            raise
        problem = refused_words(exc, "adopt_unrecorded")
        first = rt.unrecorded.refused(accepted)
        where = path or rt.unrecorded.journal.path
        log.log(
            logging.ERROR if first else logging.DEBUG,
            "%s still cannot be recorded: %s; %s, tried again every %gs, and its job is left as it is "
            "(never sent again)",
            accepted.line(),
            problem,
            f"kept in {where}" if where else "kept in memory only",
            REFUSED_RETRY_SECONDS,
            extra={
                "event": "submit.unrecorded",
                "job_id": accepted.job_id,
                "request_id": accepted.request_id,
            },
        )
        return None
    late.extend(found)
    return got


class _Late(NamedTuple):
    """An accepted submission whose job moved on without it: settled after the transaction."""

    accepted: Accepted
    endpoint: str
    #: Whether this runtime's provider holds the request (so may cancel it).
    ours: bool


def _adopt(session: Session, rt: Runtime, accepted: Accepted, proof: str, late: list[_Late]) -> bool:
    """Record ``accepted`` on its job, when the job still waits for that answer; else add it to
    ``late`` (:func:`~worker.steps.late_answers.settle_late_answer`). True when recorded now."""
    try:
        job = store.get_job(session, accepted.job_id)
    except NotFoundError:
        return False
    if job.request_id == accepted.request_id:
        return False  # recorded already (the step's own write landed after all)
    if awaits_answer(job, accepted.attempt):
        try:
            adopted = store.adopt_request(
                session,
                rt.fence(job),
                request_id=accepted.request_id,
                gateway_request_id=accepted.gateway_request_id,
                submitted_at=accepted.submitted_at,
                next_poll_at=first_poll_at(rt.settings, utcnow()),
                proof=proof,
            )
        except RequestHeldError as held:  # raised before anything was written
            # Another job of the queue holds that id: never this job's request, nor cancelled
            # at fal (it is the other job's); the job is (or stays) submit_unknown, saying so.
            how = "answered the submit (kept in the journal of accepted submits)"
            request_held_elsewhere(session, rt, rt.fence(job), held.request_id, held.holder, how=how)
            return False
        if adopted:
            extra = {"event": "submit.adopted", "job_id": job.id, "request_id": accepted.request_id}
            # Said once committed: a commit the database refuses (its disk is full) records nothing.
            said = partial(log.warning, "%s recorded: %s", accepted.line(), proof, extra=extra)
            db.after_commit(session, said)
            return True
        return False
    late.append(_Late(accepted, job.endpoint, rt.reach(session).covers(job.batch_id)))
    return False


def cancel_jobs_of_cancelled_batches(rt: Runtime) -> int:
    """Carry out ``wanbatch cancel``: nothing more is sent, and what fal holds is cancelled there.

    Jobs fal does not hold end ``cancelled`` at once, in one set-based statement per state
    (:func:`jobs.store.cancel_unsent_jobs`), so a 100,000-job batch is cancelled in seconds.

    Then the requests at fal, in the order that bills nothing needlessly: every ``queued`` one
    first — a cancel is free while a request is IN_QUEUE — and the ``running`` ones only once
    no request of these batches can still be waiting in fal's queue. Cancelling a running
    request frees one of the account's slots and fal starts the request at the head of its FIFO
    queue at once; if that were ours, it would then be cancelled while running, and billed. So
    while a queued cancel failed (it is tried again next tick) or a submit of these batches is
    still in flight, running requests wait.

    The ``queued`` ones go newest first, from the tail of fal's queue
    (:func:`~worker.steps.context.tail_of_fal_queue_first`): our ``queued`` lags fal, and the
    oldest of them may be running already. Oldest first, cancelling such a one would free a
    slot into which fal starts our next queued request just before its own cancel arrives —
    billed as cancelled while running. Newest first, every request of ours behind it in fal's
    queue is cancelled before it.

    Cancelled requests become ``cancelling``; the poller then ends them ``cancelled`` — or, if
    fal finished them anyway (we pay for those), downloads them. Runs every tick, so a job that
    was mid-submit when the batch was cancelled is caught as soon as fal has accepted it.

    A cancel fal does not take (a redirect, a refusal, a gateway error) is tried again a bounded
    number of times, a transient failure after a backoff, then given up
    (:mod:`worker.steps.cancel_tries`): the job stays ``queued`` or ``running`` (fal may still
    run and bill it), and a run of the batch ends naming it instead of asking for ever.

    The cancels go off the conductor's loop, in this order, within a bound
    (:mod:`worker.steps.cancels`): one fal does not answer in time is not known yet — no failed
    try, not ``cancelling``, sent again next tick (a queued one holding the running ones back
    meanwhile) — and the tick goes on.
    """
    # Only a look first (every tick, nearly always finding nothing): no write lock for nothing.
    with db.read_scope(rt.engine) as session:
        # `cancel B` cancels B only
        cancelled = [b for b in store.cancelled_batches_with_work(session) if rt.in_scope(b)]
        if cancelled:  # and a simulation's requests are its simulator's to cancel
            reach = rt.reach(session)
            cancelled = [b for b in cancelled if reach.covers(b)]
    if not cancelled:
        return 0
    with db.session_scope(rt.engine) as session:
        reach = rt.reach(session)
        moved = store.cancel_unsent_jobs(
            session,
            cancelled,
            reason="batch cancelled",
            error="cancelled by user",
            error_type=USER_CANCELLED,
            worker=rt.owner,
        )
        # A request sent to another fal queue is that queue's processes' to cancel (Runtime.reach).
        at_fal = [
            j
            for b in cancelled
            for j in store.jobs_of_batch(session, b, states=[S.QUEUED, S.RUNNING])
            if reach.holds(j)
        ]
        queued = tail_of_fal_queue_first(j for j in at_fal if j.state == S.QUEUED)
        running = [j for j in at_fal if j.state == S.RUNNING]
        in_flight = sum(store.count_in_states(session, [S.SUBMITTING], batch_id=b) for b in cancelled)
        plan: list[tuple[Fence, RequestHandle, str | None]] = [
            (rt.fence(j), handle_of(j, rt.settings.fal_queue_url), rt.other_key(j))
            for j in [*queued, *running]
        ]
    if not plan:
        return moved
    sent = in_lane(rt, "cancel", lambda round_: _cancel_in_order(rt, round_, plan, may_still_queue=in_flight))
    return moved + (sent or 0)


def _cancel_in_order(
    rt: Runtime,
    round_: CancelRound,
    plan: list[tuple[Fence, RequestHandle, str | None]],
    *,
    may_still_queue: int,
) -> int:
    """Send the cancels of ``plan`` in its order (:func:`cancel_jobs_of_cancelled_batches`), on
    the cancels' own thread within ``round_``'s deadline (:mod:`worker.steps.cancels`); how many
    jobs moved to ``cancelling``. A cancel nothing answered in time (or not sent before the
    deadline) is not known yet: not a failed try, not recorded, sent again next tick — and, a
    queued one, it holds the running ones back as a failed one does."""
    moved = 0
    tries = rt.cancel_tries
    for fence, handle, other_key in plan:
        if fence.state == S.RUNNING and may_still_queue:
            log.info(
                "cancel: %d request(s) of cancelled batches may still wait in fal's queue; "
                "running ones are cancelled after them",
                may_still_queue,
                extra={"event": "cancel.waiting_for_queued"},
            )
            break
        if not rt.other_keys.cancel_due(fence.job_id, handle.request_id):
            continue  # another key's request fal did not know for this key: asked again later
        if not tries.due(fence.job_id, handle.request_id):
            # Waiting out a transient failure (a queued one holds the running ones back:
            # cancelling one of those would free a slot into which fal starts it, and bill it),
            # or given up (:mod:`worker.steps.cancel_tries`): fal will start that one whenever a
            # slot frees, a running one's end included, so it holds nothing back; holding the
            # running ones back would only pay for their whole runs, and keep `cancel` waiting.
            may_still_queue += _may_still_queue(tries, fence, handle)
            continue
        try:
            outcome = round_.send(handle)
        except ProviderError as exc:
            _cancel_failed(rt, fence, handle, exc)
            may_still_queue += _may_still_queue(tries, fence, handle)
            continue
        if outcome is None:  # not known yet: whether fal took it is learnt next tick
            may_still_queue += fence.state == S.QUEUED
            continue
        tries.done(fence.job_id)
        if outcome == CancelOutcome.NOT_FOUND and other_key is not None:
            _not_ours_to_cancel(rt, fence, handle, other_key)
            continue
        with db.session_scope(rt.engine) as session:
            moved += store.mark_cancelling(session, fence, reason=f"cancel requested at fal: {outcome.value}")
    return moved


def _not_ours_to_cancel(rt: Runtime, fence: Fence, handle: RequestHandle, key_id: str) -> None:
    """fal answered "not found" to a cancel of a request sent with another API key (``key_id``):
    a key of another account is told so of every request of the account that sent it, so
    nothing was cancelled — it may still run and bill there. Not recorded as a cancel (the job
    stays ``queued`` or ``running``, never ``cancelling``); noted
    (:meth:`~worker.steps.other_key.OtherKeys.cancel_refused`), so that a run of the batch ends
    naming it and the way out (``wanbatch cancel BATCH --abandon-other-key``), in the database
    too (:meth:`~worker.steps.context.Runtime.key_refused`): a ``run`` or ``cancel`` watching the
    workers sees it. A warning the first time this process meets it, debug level after."""
    first = rt.key_refused(fence.job_id, handle.request_id, key_id, cancel=True)
    log.log(
        logging.WARNING if first else logging.DEBUG,
        'job %s: fal answered "not found" to the cancel of request %s, sent with another API key '
        "(key id %s): not cancelled (fal may still run and bill it); a process with that key can "
        "cancel it, or `wanbatch cancel BATCH --abandon-other-key` writes it off",
        fence.job_id,
        handle.request_id,
        key_id,
        extra={"event": "cancel.other_key", "job_id": fence.job_id, "request_id": handle.request_id},
    )


def _may_still_queue(tries: CancelTries, fence: Fence, handle: RequestHandle) -> bool:
    """Whether ``fence``'s request, whose cancel was not taken this round, may still wait in
    fal's queue for a slot a cancelled running request would free: queued, and its cancel not
    given up (one given up is started by fal whenever a slot frees anyway)."""
    return fence.state == S.QUEUED and not tries.gave_up(fence.job_id, handle.request_id)


def _cancel_failed(rt: Runtime, fence: Fence, handle: RequestHandle, exc: ProviderError) -> None:
    """fal did not take the cancel of ``handle``: tried again (a transient failure after the
    submit's backoff, another at the next tick) until :data:`~worker.steps.cancel_tries.CANCEL_ATTEMPTS`
    tries, then given up — the job stays where fal holds it, which may still run and bill it —
    and that noted on the job's history (:func:`jobs.store.note_cancel_given_up`: ``status``
    names it once this process has ended)."""
    settings = rt.settings

    def transient_wait(count: int) -> float:
        return max(backoff(settings, count), retry_after(settings, exc))

    wait = transient_wait if isinstance(exc, RetryableProviderError) else None
    given_up = rt.cancel_tries.failed(fence.job_id, handle.request_id, one_line(str(exc)), wait=wait)
    extra = {"job_id": fence.job_id, "request_id": handle.request_id}
    if given_up is None:
        log.info(
            "job %s: cancel failed (%s); will try again",
            fence.job_id,
            exc,
            extra={"event": "cancel.failed", **extra},
        )
        return
    # On the job's history too (jobs.store.note_cancel_given_up), where `status` reads it once
    # this process has ended: the batch is cancelled, but fal may still run and bill this one.
    with db.session_scope(rt.engine) as session:
        store.note_cancel_given_up(
            session,
            fence.job_id,
            handle.request_id,
            error=given_up.error,
            tries=given_up.tries,
            worker=rt.owner,
            now=utcnow(),
        )
    # INFO, as the tries before it: a worker's log has it (its level is INFO), and an embedded
    # run that ends with the request left at fal says it once, in its own last lines
    # (worker.running.RunStats.uncancelled), not twice.
    log.info(
        "job %s: request %s could not be cancelled at fal (%s; %d tries): fal may still run and bill "
        "it; the job stays %s",
        fence.job_id,
        handle.request_id,
        given_up.error,
        given_up.tries,
        fence.state.value,
        extra={"event": "cancel.given_up", **extra},
    )


def hand_on_again(rt: Runtime, how: str) -> tuple[int, int]:
    """Send the messages of every job handed to a task not started yet once more: the broker
    lost its queued messages (``how``: it restarted, and a Redis that keeps nothing on disk lost
    its queues; or it was flushed, or its keys evicted). Each such job's history says "message
    lost by the broker (HOW): handed on again". Returns ``(submits, downloads)``.

    Without this those jobs waited for their leases to run out (``WANBATCH_LEASE_SECONDS``, two
    minutes by default) before the tick noticed. A copy is harmless: each step takes the job's
    lease fenced by its version, so of two messages for a job exactly one does the work (a
    submit's copy finds the job sent, ``skipped``, or its send recorded by the other copy first,
    ``lost-lease``: never a second POST).
    """
    with db.read_scope(rt.engine) as session:
        reach = rt.reach(session)
        submits, downloads = store.handed_off(
            session,
            queue_owner=DOWNLOAD_QUEUE,
            now=utcnow(),
            batch_ids=reach.batch_ids,
            exclude_batch_ids=reach.exclude_batch_ids,
        )
    try:  # before the copies go: a task that ran one first would have moved its job on
        with db.session_scope(rt.engine) as session:
            store.note_handed_on(
                session,
                [*submits, *downloads],
                reason=f"message lost by the broker ({how}): handed on again",
                queue_owner=DOWNLOAD_QUEUE,
                worker=rt.owner,
            )
    except SQLAlchemyError as exc:  # a note is no reason to keep the jobs waiting for their leases
        log.info(
            "could not put the lost messages on the jobs' history (%s); handing them on again all the same",
            one_line(str(exc)),
            extra={"event": "conductor.hand_on_unnoted"},
        )
    for job_id in submits:
        rt.enqueue_submit(job_id)
    for job_id in downloads:
        rt.enqueue_download(job_id)
    return len(submits), len(downloads)
