"""How a step turns a provider failure into a reason, a retry or a final failure, and
what the failed attempt cost (the billing rules are data: ``jobs/billing_rules.yaml``)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from jobs import billing, store
from jobs.errors import (
    ProviderError,
    RetryableProviderError,
)
from jobs.models import Job
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
