"""Reconcile and cancel: drive jobs whose worker vanished (expired lease) or whose submit
outcome stayed unknown, and carry out ``wanbatch cancel`` at fal."""

from __future__ import annotations

import logging
from datetime import timedelta

from jobs import store
from jobs.errors import (
    ProviderError,
)
from jobs.models import BatchState, utcnow
from jobs.states import JobState
from worker.fal.models import RequestHandle
from worker.steps.context import Runtime, S, handle_of

log = logging.getLogger(__name__)


def reconcile(rt: Runtime, limit: int = 200) -> int:
    """Drive jobs whose worker vanished, or whose submission outcome stayed unknown too long.

    * ``submitting`` past its lease: if the POST never started (no recorded input) the job goes
      back to ``pending`` — safe to send; otherwise its outcome is unknown (``submit_unknown``).
    * ``submit_unknown`` past its deadline: the policy decides — fail with "submission outcome
      unknown", or resubmit as a new attempt counted as a possible duplicate charge.
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
                ok = store.transition(
                    session, job.id, S.SUBMITTING, S.SUBMIT_UNKNOWN, expected_version=job.version,
                    reason="worker lost while submitting: outcome unknown", worker=rt.owner,
                    error="submission outcome unknown (worker lost during the POST)",
                    error_type="submit_unknown",
                    next_attempt_at=now + timedelta(seconds=rt.settings.submit_unknown_deadline),
                    lease_owner=None, lease_expires_at=None,
                )  # fmt: skip
            moved += ok
        for job in store.claim_jobs(
            session, states=[S.SUBMIT_UNKNOWN], limit=limit, now=now, owner=rt.owner,
            lease_seconds=rt.settings.lease_seconds,
        ):  # fmt: skip
            if rt.settings.submit_unknown_policy == "resubmit" and job.attempts < rt.settings.max_attempts:
                ok = store.transition(
                    session, job.id, S.SUBMIT_UNKNOWN, S.RETRY_WAIT, expected_version=job.version,
                    reason="outcome still unknown: resubmitting (possible duplicate charge)", worker=rt.owner,
                    possible_duplicate_charges=job.possible_duplicate_charges + 1,
                    lease_owner=None, lease_expires_at=None,
                )  # fmt: skip
            else:
                ok = store.transition(
                    session, job.id, S.SUBMIT_UNKNOWN, S.FAILED, expected_version=job.version,
                    reason="submission outcome unknown", worker=rt.owner,
                    error="submission outcome unknown: fal may have accepted (and billed) it; "
                    "`wanbatch rerun --failed-only` sends it again",
                    error_type="submit_unknown",
                )  # fmt: skip
            moved += ok
    return moved


def cancel_jobs_of_cancelled_batches(rt: Runtime) -> int:
    """Carry out ``wanbatch cancel``: nothing more is sent, and what fal holds is cancelled there.

    Jobs not yet at fal end ``cancelled`` at once. Queued or running ones get a cancel request
    and become ``cancelling``; the poller then ends them ``cancelled`` — or, if fal finished
    them anyway (we pay for those), downloads them. Runs every tick, so a job that was mid-submit
    when the batch was cancelled is caught as soon as fal has accepted it.
    """
    moved = 0
    with store.session_scope(rt.engine) as session:
        cancelled = [b.id for b in store.list_batches(session) if b.state == BatchState.CANCELLED]
        to_cancel_at_fal: list[tuple[str, int, JobState, RequestHandle]] = []
        for batch_id in cancelled:
            for job in list(
                store.jobs_of_batch(
                    session, batch_id, states=[S.PENDING, S.RETRY_WAIT, S.SUBMIT_UNKNOWN, S.QUEUED, S.RUNNING]
                )
            ):
                if job.state in (S.QUEUED, S.RUNNING):
                    to_cancel_at_fal.append(
                        (job.id, job.version, job.state, handle_of(job, rt.settings.fal_queue_url))
                    )
                    continue
                moved += store.transition(
                    session, job.id, job.state, S.CANCELLED, expected_version=job.version,
                    reason="batch cancelled", worker=rt.owner,
                    error="cancelled by user", error_type="cancelled",
                )  # fmt: skip
    for job_id, version, state, handle in to_cancel_at_fal:
        try:
            outcome = rt.client.cancel(handle)
        except ProviderError as exc:
            log.info("job %s: cancel failed (%s); will try again", job_id, exc)
            continue
        with store.session_scope(rt.engine) as session:
            moved += store.transition(
                session, job_id, state, S.CANCELLING, expected_version=version,
                reason=f"cancel requested at fal: {outcome.value}", worker=rt.owner,
                next_attempt_at=utcnow(),
            )  # fmt: skip
    return moved
