"""Reconcile and cancel: drive jobs whose worker vanished (expired lease) or whose submit
outcome stayed unknown, and carry out ``wanbatch cancel`` at fal."""

from __future__ import annotations

import logging

from jobs import store
from jobs.errors import (
    ProviderError,
)
from jobs.models import BatchState, utcnow
from jobs.states import JobState
from worker.fal.models import RequestHandle
from worker.steps.context import Runtime, S, handle_of
from worker.steps.failures import mark_submit_unknown, settle_unknown_submit, unknown_submit_wait_over

log = logging.getLogger(__name__)


def reconcile(rt: Runtime, limit: int = 200) -> int:
    """Drive jobs whose worker vanished, or whose submission outcome stayed unknown too long.

    * ``submitting`` past its lease: if the POST never started (no recorded input) the job goes
      back to ``pending`` — safe to send; otherwise its outcome is unknown (``submit_unknown``).
    * ``submit_unknown`` past its deadline: the policy decides — fail with "submission outcome
      unknown", or resubmit as a new attempt counted as a possible duplicate charge. Without a
      webhook receiver nothing can prove the outcome, so there is no deadline to wait for: the
      policy is applied at once (:func:`~worker.steps.failures.mark_submit_unknown`).

    With a batch scope (``rt.batch_ids``) the first is still done for every batch: it sends
    nothing, and a dead process's expired claims would otherwise hold the global outstanding cap.
    The second decides a batch's fate (fail it, or pay again), so only the scope's jobs get it.
    """
    now = utcnow()
    moved = 0
    with store.session_scope(rt.engine) as session:
        for job in store.claim_jobs(
            session, states=[S.SUBMITTING], limit=limit, now=now, owner=rt.owner,
            lease_seconds=rt.settings.lease_seconds,
        ):  # fmt: skip
            if job.submitted_input is None:
                ok = store.transition(
                    session, job.id, S.SUBMITTING, S.PENDING, expected_version=job.version,
                    reason="worker lost before sending; safe to send", worker=rt.owner,
                    attempts=max(0, job.attempts - 1), lease_owner=None, lease_expires_at=None,
                )  # fmt: skip
            else:
                ok = mark_submit_unknown(
                    session, rt, job.id, job.version, "the worker was lost during the POST",
                    settle_now=rt.in_scope(job.batch_id),
                )  # fmt: skip
            moved += ok
        for job in store.claim_jobs(
            session, states=[S.SUBMIT_UNKNOWN], limit=limit, now=now, owner=rt.owner,
            lease_seconds=rt.settings.lease_seconds, batch_ids=rt.batch_ids,
        ):  # fmt: skip
            moved += settle_unknown_submit(session, rt, job, unknown_submit_wait_over(rt.settings))
    return moved


def cancel_jobs_of_cancelled_batches(rt: Runtime) -> int:
    """Carry out ``wanbatch cancel``: nothing more is sent, and what fal holds is cancelled there.

    Jobs fal does not hold end ``cancelled`` at once, in one set-based statement per state
    (:func:`jobs.store.cancel_unsent_jobs`), so a 100,000-job batch is cancelled in seconds.

    Then the requests at fal, in the order that bills nothing needlessly: every ``queued`` one
    first, oldest first (the head of fal's queue starts next) — a cancel is free while a
    request is IN_QUEUE — and the ``running`` ones only once no request of these batches can
    still be waiting in fal's queue. Cancelling a running request frees one of the account's
    slots and fal starts the next queued request at once; if that were ours, it would then be
    cancelled while running, and billed. So while a queued cancel failed (it is tried again
    next tick) or a submit of these batches is still in flight, running requests wait.

    Cancelled requests become ``cancelling``; the poller then ends them ``cancelled`` — or, if
    fal finished them anyway (we pay for those), downloads them. Runs every tick, so a job that
    was mid-submit when the batch was cancelled is caught as soon as fal has accepted it.
    """
    with store.session_scope(rt.engine) as session:
        cancelled = [
            b.id
            for b in store.list_batches(session)
            if b.state == BatchState.CANCELLED and rt.in_scope(b.id)  # `cancel B` cancels B only
        ]
        if not cancelled:
            return 0
        moved = store.cancel_unsent_jobs(
            session, cancelled, reason="batch cancelled", error="cancelled by user",
            error_type="cancelled", worker=rt.owner,
        )  # fmt: skip
        at_fal = [j for b in cancelled for j in store.jobs_of_batch(session, b, states=[S.QUEUED, S.RUNNING])]
        queued = sorted(
            (j for j in at_fal if j.state == S.QUEUED),
            key=lambda j: (j.submitted_at or j.created_at, j.item_index),
        )
        running = [j for j in at_fal if j.state == S.RUNNING]
        in_flight = sum(store.count_in_states(session, [S.SUBMITTING], batch_id=b) for b in cancelled)
        plan: list[tuple[str, int, JobState, RequestHandle]] = [
            (j.id, j.version, j.state, handle_of(j, rt.settings.fal_queue_url)) for j in [*queued, *running]
        ]
    may_still_queue = in_flight
    for job_id, version, state, handle in plan:
        if state == S.RUNNING and may_still_queue:
            log.info(
                "cancel: %d request(s) of cancelled batches may still wait in fal's queue; "
                "running ones are cancelled after them",
                may_still_queue,
            )
            break
        try:
            outcome = rt.client.cancel(handle)
        except ProviderError as exc:
            log.info("job %s: cancel failed (%s); will try again", job_id, exc)
            may_still_queue += state == S.QUEUED
            continue
        with store.session_scope(rt.engine) as session:
            moved += store.transition(
                session, job_id, state, S.CANCELLING, expected_version=version,
                reason=f"cancel requested at fal: {outcome.value}", worker=rt.owner,
                next_attempt_at=utcnow(),
            )  # fmt: skip
    return moved
