"""How a step turns a provider failure into a reason, a retry or a final failure, and
what the failed attempt cost (the billing rules are data: ``jobs/billing_rules.yaml``)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from jobs import billing, store
from jobs.errors import (
    AccountLockedError,
    ProviderError,
    RetryableProviderError,
)
from jobs.models import BatchState, Job, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from worker.steps.context import Runtime, S

log = logging.getLogger(__name__)


def backoff(settings: Settings, attempt: int) -> float:
    delay = settings.retry_base_delay * (2 ** max(0, attempt - 1))
    return float(min(settings.retry_max_delay, delay))


def describe(exc: ProviderError) -> str:
    """The provider's own words for a failure, short enough for a status line and an export."""
    detail = exc.detail
    if isinstance(detail, list):
        parts = []
        for d in detail:
            if isinstance(d, dict):
                loc = ".".join(str(x) for x in d.get("loc", []) if x != "body")
                parts.append(f"{loc}: {d.get('msg', '')}".strip(": "))
            else:
                parts.append(str(d))
        text = "; ".join(parts)
    elif isinstance(detail, str) and detail:
        text = detail
    else:
        text = str(exc)
    prefix = f"HTTP {exc.status_code}: " if exc.status_code else ""
    return prefix + text


def retry_or_fail(
    session: Any,
    rt: Runtime,
    job: Job,
    expected: JobState,
    version: int,
    exc: ProviderError,
    now: datetime,
    **fields: Any,
) -> None:
    """Back off and try again, or fail after the last attempt; ``fields`` are written either way."""
    reason = describe(exc)
    if job.attempts < rt.settings.max_attempts:
        delay = backoff(rt.settings, job.attempts)
        if isinstance(exc, RetryableProviderError) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        store.transition(
            session,
            job.id,
            expected,
            S.RETRY_WAIT,
            expected_version=version,
            reason=f"retry in {delay:.0f}s: {reason}",
            worker=rt.owner,
            error=reason,
            error_type=exc.error_type,
            next_attempt_at=now + timedelta(seconds=delay),
            lease_owner=None,
            lease_expires_at=None,
            **fields,
        )
    else:
        store.transition(
            session,
            job.id,
            expected,
            S.FAILED,
            expected_version=version,
            reason=f"gave up after {job.attempts} attempt(s): {reason}",
            worker=rt.owner,
            error=f"after {job.attempts} attempt(s): {reason}",
            error_type=exc.error_type,
            **fields,
        )


def billed(job: Job, outcome: billing.Outcome) -> dict[str, Any]:
    """The job's actual cost after this attempt ended as ``outcome`` (earlier attempts included)."""
    return billing.billed(
        outcome,
        job.est_billing_units,
        job.est_usd,
        prior_units=job.actual_billing_units,
        prior_usd=job.actual_usd,
    )


def cost_of_failure(job: Job, exc: ProviderError) -> dict[str, Any]:
    """What fal bills for an attempt that ended in ``exc``: the rule for its outcome class
    (``jobs/billing_rules.yaml``: 5xx never, a 422 only when a runner spent inference time)."""
    return billed(job, billing.classify_failure(exc.status_code, exc.error_type, job.provider_metrics))


# ------------------------------------------------------------------ submissions of unknown outcome

#: Why waiting on an ambiguous submit cannot help when no webhook receiver is configured.
NO_RECEIVER = (
    "no webhook receiver is configured (WANBATCH_WEBHOOK_URL), so nothing can prove whether fal "
    "accepted it and waiting would change nothing"
)


def mark_submit_unknown(
    session: Any, rt: Runtime, job_id: str, version: int, why: str, *, settle_now: bool = True
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
    waits = bool(rt.settings.webhook_url)
    moved = store.transition(
        session, job_id, S.SUBMITTING, S.SUBMIT_UNKNOWN, expected_version=version,
        reason=f"submit outcome unknown: {why}", worker=rt.owner,
        error=f"submission outcome unknown: {why}", error_type="submit_unknown",
        next_attempt_at=utcnow() + timedelta(seconds=rt.settings.submit_unknown_deadline if waits else 0),
        lease_owner=None, lease_expires_at=None,
    )  # fmt: skip
    if moved and settle_now and not waits:
        settle_unknown_submit(session, rt, store.get_job(session, job_id), NO_RECEIVER)
    return moved


def unknown_submit_wait_over(settings: Settings) -> str:
    """Why a ``submit_unknown`` job that came due is settled now (for its reason)."""
    if not settings.webhook_url:
        return NO_RECEIVER
    deadline = settings.submit_unknown_deadline
    return f"no webhook proved it within WANBATCH_SUBMIT_UNKNOWN_DEADLINE ({deadline:g}s)"


def settle_unknown_submit(session: Any, rt: Runtime, job: Job, why: str) -> bool:
    """Apply ``WANBATCH_SUBMIT_UNKNOWN_POLICY`` to ``job`` (in ``submit_unknown`` at ``job.version``).

    ``resubmit`` (while attempts remain) sends it again as a new attempt, counted in
    ``possible_duplicate_charges``; otherwise it fails with "submission outcome unknown" and why.
    """
    if rt.settings.submit_unknown_policy == "resubmit" and job.attempts < rt.settings.max_attempts:
        return store.transition(
            session, job.id, S.SUBMIT_UNKNOWN, S.RETRY_WAIT, expected_version=job.version,
            reason=f"outcome unknown ({why}): resubmitting (possible duplicate charge)", worker=rt.owner,
            possible_duplicate_charges=job.possible_duplicate_charges + 1,
            lease_owner=None, lease_expires_at=None,
        )  # fmt: skip
    spent = " (no attempt left to resubmit)" if rt.settings.submit_unknown_policy == "resubmit" else ""
    return store.transition(
        session, job.id, S.SUBMIT_UNKNOWN, S.FAILED, expected_version=job.version,
        reason=f"submission outcome unknown: {why}{spent}", worker=rt.owner,
        error=f"submission outcome unknown ({why}){spent}: fal may have accepted (and billed) it; "
        "`wanbatch rerun --failed-only` sends it again",
        error_type="submit_unknown",
    )  # fmt: skip


# ------------------------------------------------------------------ failures that are not the job's


def give_back(
    session: Any, rt: Runtime, job_id: str, version: int, reason: str, delay: float, **fields: Any
) -> bool:
    """``submitting`` → ``pending``, the attempt not counted: the POST never left this process."""
    job = store.get_job(session, job_id)
    return store.transition(
        session, job_id, S.SUBMITTING, S.PENDING, expected_version=version,
        reason=reason, worker=rt.owner, attempts=max(0, job.attempts - 1),
        lease_owner=None, lease_expires_at=None, next_attempt_at=utcnow() + timedelta(seconds=delay),
        **fields,
    )  # fmt: skip


def pause_for_account(session: Any, batch_id: str, exc: AccountLockedError) -> str:
    """Pause ``batch_id`` because fal refused the account (401/402/403); returns the reason.

    The same refusal would meet every job, so none is failed for it: the batch stops sending,
    ``status`` shows the reason, and the jobs stay where they are (requests already at fal are
    still polled: they run and are billed regardless). Running the batch again resumes it.
    """
    reason = f"{exc} — fix the key or the account, then run the batch again to resume"
    store.set_batch_state(session, batch_id, BatchState.PAUSED, reason=reason)
    return reason
