"""How a step turns a provider failure into a reason, a retry or a final failure, and
what the failed attempt cost (the billing rules are data: ``jobs/billing_rules.yaml``)."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.orm import Session

from jobs import billing, store
from jobs.errors import AccountLockedError, FinalProviderError, ProviderError, RetryableProviderError
from jobs.models import BatchState, Job, JobView
from jobs.settings import RetrySettings, Settings
from jobs.store import Fence
from worker import telemetry
from worker.fal.errors import ResultExpiredError, error_type_or_none, format_detail
from worker.steps.context import Runtime, in_seconds

log = logging.getLogger(__name__)


def backoff(retry: RetrySettings, attempt: int) -> float:
    """Seconds before ``attempt`` is tried again: base × 2^(attempt-1), capped."""
    delay = retry.retry_base_delay * (2 ** max(0, attempt - 1))
    return float(min(retry.retry_max_delay, delay))


def retry_after(retry: RetrySettings, exc: ProviderError) -> float:
    """fal's ``Retry-After`` for ``exc`` in seconds (0 without one), capped at
    ``WANBATCH_RETRY_MAX_DELAY``: a provider's hint, not a licence to stall a batch for a year."""
    hint = getattr(exc, "retry_after", None) or 0.0
    return float(min(hint, retry.retry_max_delay))


def describe(exc: ProviderError) -> str:
    """The provider's own words for a failure, short enough for a status line and an export."""
    prefix = f"HTTP {exc.status_code}: " if exc.status_code else ""
    return prefix + (format_detail(exc.detail) or str(exc))


def kind_of(exc: ProviderError) -> str | None:
    """The job's ``error_type`` for ``exc``: fal's own when it gave one, else what we know the
    failure to be — a result gone (``result_expired``), a request fal does not know
    (``request_not_found``) — so `status` groups them by name, not as a bare "error". Billing
    reads fal's ``exc.error_type`` alone (:func:`cost_of_failure`).

    fal's own is kept only in an error type's shape (:func:`~worker.fal.errors.error_type_or_none`):
    it is stored, shown and published as a metrics label as it is, so anything else an error
    carries there (an echoed key) is not."""
    own = error_type_or_none(exc.error_type)
    if own:
        return own
    if isinstance(exc, ResultExpiredError):
        return "result_expired"
    if isinstance(exc, FinalProviderError) and exc.status_code == 404:
        return "request_not_found"
    return None


def settle(session: Session, rt: Runtime, fence: Fence, exc: ProviderError, **cost: Any) -> None:
    """What an attempt that fal failed leads to, for submit and download alike: a retry or the end.

    Only a failure that may pass (:class:`RetryableProviderError`) is tried again, as a new
    attempt after a backoff (at least fal's ``Retry-After``), while attempts remain
    (``WANBATCH_MAX_ATTEMPTS``); any other failure, or the last attempt's, ends the job with
    fal's own words. ``cost`` (what fal billed for the attempt) is recorded either way.
    """
    reason = describe(exc)
    telemetry.count_provider_error(exc)
    if not isinstance(exc, RetryableProviderError):
        store.fail_job(session, fence, error=reason, error_type=kind_of(exc), **cost)
        return
    # Requests fal ended unstarted at a window's end are not the job's failures: not counted.
    attempts = store.get_job(session, fence.job_id).counted_attempts
    if attempts >= rt.settings.max_attempts:
        store.fail_job(
            session,
            fence,
            reason=f"gave up after {attempts} attempt(s): {reason}",
            error=f"after {attempts} attempt(s): {reason}",
            error_type=kind_of(exc),
            **cost,
        )
        return
    delay = max(backoff(rt.settings, attempts), retry_after(rt.settings, exc))
    if store.retry_later(
        session,
        fence,
        reason=f"retry in {delay:.0f}s: {reason}",
        at=in_seconds(delay),
        error=reason,
        error_type=kind_of(exc),
        **cost,
    ):
        telemetry.count_retry("provider_error")


def billed(job: JobView, outcome: billing.Outcome) -> dict[str, Any]:
    """The job's actual cost after this attempt ended as ``outcome`` (earlier attempts included)."""
    return billing.billed(
        outcome,
        job.est_billing_units,
        job.est_usd,
        prior_units=job.actual_billing_units,
        prior_usd=job.actual_usd,
    )


def cost_of_failure(job: JobView, exc: ProviderError) -> dict[str, Any]:
    """What fal bills for an attempt that ended in ``exc``: the rule for its outcome class
    (``jobs/billing_rules.yaml``: 5xx never, a 422 only when a runner spent inference time)."""
    return billed(job, billing.classify_failure(exc.status_code, exc.error_type, job.provider_metrics))


# ------------------------------------------------------------------ submissions of unknown outcome

#: Why waiting on an ambiguous submit cannot help when no webhook receiver is configured.
NO_RECEIVER = (
    "no webhook receiver is configured (WANBATCH_WEBHOOK_URL), so nothing can prove whether fal "
    "accepted it and waiting would change nothing"
)


def submit_outcome_unknown(
    session: Session, rt: Runtime, fence: Fence, why: str, *, settle_now: bool = True
) -> bool:
    """``submitting`` → ``submit_unknown`` for a POST that may have been accepted; then, unless
    something can still prove the outcome, ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` at once.

    Only fal's webhook (sent to ``WANBATCH_WEBHOOK_URL`` with the job id and attempt) can tell
    later whether such a request exists — fal has no "list my requests" call. With a receiver
    the job waits up to ``WANBATCH_SUBMIT_UNKNOWN_DEADLINE`` for that proof; without one it
    would wait for nothing, so the policy is applied now (``settle_now``; else the job is due
    at once for the reconciler) and the reason says why. The event into ``submit_unknown`` is
    written either way: the history shows the ambiguity.
    """
    if rt.simulated:
        return resend_to_simulator(session, rt, fence, why)
    waits = bool(rt.settings.webhook_url)
    deadline = in_seconds(rt.settings.submit_unknown_deadline if waits else 0)
    moved = store.mark_submit_unknown(session, fence, why=why, due_at=deadline)
    if moved:
        telemetry.count_ambiguous_submit()
    if moved and settle_now and not waits:
        settle_unknown_submit(session, rt, store.get_job(session, fence.job_id), NO_RECEIVER)
    return moved


def unknown_submit_wait_over(settings: Settings) -> str:
    """Why a ``submit_unknown`` job that came due is settled now (for its reason)."""
    if not settings.webhook_url:
        return NO_RECEIVER
    deadline = settings.submit_unknown_deadline
    return f"no webhook proved it within WANBATCH_SUBMIT_UNKNOWN_DEADLINE ({deadline:g}s)"


def settle_unknown_submit(session: Session, rt: Runtime, job: Job, why: str) -> bool:
    """Apply ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` to ``job`` (in ``submit_unknown`` at ``job.version``).

    ``resubmit`` (while attempts remain) sends it again as a new attempt, counted in
    ``possible_duplicate_charges`` when that attempt's POST is recorded as sent
    (:func:`jobs.store.record_send`), so a job cancelled before it is not; otherwise it fails
    with "submission outcome unknown" and why.
    """
    fence = rt.fence(job)
    if rt.simulated:
        return resend_to_simulator(session, rt, fence, why)
    resubmit = rt.settings.submit_unknown_policy == "resubmit"
    if resubmit and job.counted_attempts < rt.settings.max_attempts:
        resent = store.retry_later(
            session,
            fence,
            reason=f"outcome unknown ({why}): resubmitting (possible duplicate charge)",
            possible_duplicate=True,
        )
        if resent:
            telemetry.count_retry("ambiguous_resubmit")
        return resent
    spent = " (no attempt left to resubmit)" if resubmit else ""
    return store.fail_job(
        session,
        fence,
        reason=f"submission outcome unknown: {why}{spent}",
        error=f"submission outcome unknown ({why}){spent}: fal may have accepted (and billed) it; "
        "`wanbatch rerun --failed-only` sends it again",
        error_type="submit_unknown",
    )


def resend_to_simulator(session: Session, rt: Runtime, fence: Fence, why: str) -> bool:
    """A simulation's submit whose outcome is unknown (``submitting`` or ``submit_unknown``):
    send it again, to this ``--simulate`` run's simulator, while attempts remain.

    It went to a simulator, never to a provider that bills: nothing of it was possibly billed,
    and sending it again costs nothing (:data:`jobs.store.UNPROVEN_EXITS` leaves a simulation's
    money alone). The simulator that may have it lived in a process that stopped (a lost
    worker), or is this run's own, where a request it keeps is only a placeholder render; so
    neither the policy nor a possible duplicate charge applies. Only when no attempt is left
    (``WANBATCH_MAX_ATTEMPTS``) does it fail, without words of billing.
    """
    attempts = store.get_job(session, fence.job_id).counted_attempts
    if attempts < rt.settings.max_attempts:
        return store.retry_later(
            session,
            fence,
            reason=f"outcome unknown ({why}): a simulation's request, never at fal: "
            "sent again to this run's simulator",
        )
    return store.fail_job(
        session,
        fence,
        reason=f"submission outcome unknown: {why} (no attempt left)",
        error=f"submission outcome unknown ({why}) after {attempts} attempt(s): a simulation, "
        "nothing was billed; `wanbatch rerun --failed-only --simulate` sends it again",
        error_type="submit_unknown",
    )


# ------------------------------------------------------------------ failures that are not the job's


def pause_for_account(session: Session, batch_id: str, exc: AccountLockedError) -> str:
    """Pause ``batch_id`` because fal refused the account (401/402/403); returns the reason.

    The same refusal would meet every job, so none is failed for it: the batch stops sending,
    ``status`` shows the reason, and the jobs stay where they are (requests already at fal are
    still polled: they run and are billed regardless). Running the batch again resumes it.
    """
    reason = f"{exc} (the key or the account)"  # `status` adds how to go on once it is fixed
    store.set_batch_state(session, batch_id, BatchState.PAUSED, reason=reason)
    return reason
