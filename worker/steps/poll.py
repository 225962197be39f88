"""Poll: ask fal for the status of due in-flight jobs, batched, with an interval that grows
with the time waited; completed jobs go on to download. No worker slot waits on fal."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from jobs import billing, store
from jobs.errors import (
    FinalProviderError,
    ProviderError,
)
from jobs.models import utcnow
from jobs.settings import Settings
from jobs.states import JobState
from worker.fal.models import Status
from worker.steps.context import DOWNLOAD_QUEUE, Runtime, S, handle_of
from worker.steps.failures import billed, describe

log = logging.getLogger(__name__)


def _next_poll(settings: Settings, submitted_at: datetime | None, now: datetime) -> datetime:
    """Poll often at first, then back off as the job waits (a quarter of the time waited)."""
    waited = (now - submitted_at).total_seconds() if submitted_at else 0.0
    interval = min(settings.poll_max_interval, max(settings.poll_min_interval, waited / 4))
    return now + timedelta(seconds=interval)


def poll(rt: Runtime, limit: int = 200) -> int:
    """Ask fal for the status of every due in-flight job; returns how many status calls were made."""
    now = utcnow()
    with store.session_scope(rt.engine) as session:
        due = store.claim_jobs(
            session,
            states=[S.QUEUED, S.RUNNING, S.CANCELLING],
            limit=limit,
            now=now,
            owner=rt.owner,
            lease_seconds=rt.settings.lease_seconds,
        )
        snapshot = [
            (j.id, j.version, j.state, handle_of(j, rt.settings.fal_queue_url), j.submitted_at) for j in due
        ]
    calls = 0
    for job_id, version, state, handle, submitted_at in snapshot:
        calls += 1
        try:
            status = rt.client.status(handle)
        except FinalProviderError as exc:
            with store.session_scope(rt.engine) as session:
                store.transition(
                    session, job_id, state, S.FAILED, expected_version=version,
                    reason=f"status: {describe(exc)}", worker=rt.owner,
                    error=f"provider lost the request: {describe(exc)}", error_type=exc.error_type,
                )  # fmt: skip
            continue
        except ProviderError as exc:
            log.info("job %s: status failed (%s); will ask again", job_id, exc)
            with store.session_scope(rt.engine) as session:
                store.release_lease(
                    session, job_id, expected_version=version,
                    next_attempt_at=_next_poll(rt.settings, submitted_at, utcnow()),
                )  # fmt: skip
            continue
        _apply_status(rt, job_id, version, state, status, submitted_at)
    return calls


def _cancel_outcome(status: Status) -> billing.Outcome:
    """How a request we asked to cancel ended, for billing: cancelled (queued or running) or an error."""
    if status.error_type in (None, "client_cancelled"):
        return billing.classify_cancel(status.metrics)
    return billing.classify_failure(None, status.error_type, status.metrics)


def _apply_status(
    rt: Runtime, job_id: str, version: int, state: JobState, status: Status, submitted_at: datetime | None
) -> None:
    now = utcnow()
    with store.session_scope(rt.engine) as session:
        if status.completed:
            if state == S.CANCELLING and status.failed:
                job = store.get_job(session, job_id)
                store.transition(
                    session, job_id, state, S.CANCELLED, expected_version=version,
                    reason=f"cancelled at fal ({status.error_type or status.error})", worker=rt.owner,
                    error="cancelled by user", error_type=status.error_type, completed_at=now,
                    provider_metrics=status.metrics or None,
                    **billed(job, _cancel_outcome(status)),
                )  # fmt: skip
                return
            moved = store.transition(
                session, job_id, state, S.DOWNLOADING, expected_version=version,
                reason="completed at fal" + (f" with error {status.error_type}" if status.failed else ""),
                worker=rt.owner, completed_at=now, provider_metrics=status.metrics or None,
                lease_owner=DOWNLOAD_QUEUE, lease_expires_at=rt.lease_until(now),
            )  # fmt: skip
            if moved:
                session.commit()
                rt.enqueue_download(job_id)
            return
        if status.state == "IN_PROGRESS" and state == S.QUEUED:
            store.transition(
                session, job_id, S.QUEUED, S.RUNNING, expected_version=version, reason="running at fal",
                worker=rt.owner, next_attempt_at=_next_poll(rt.settings, submitted_at, now),
                lease_owner=None, lease_expires_at=None,
            )  # fmt: skip
            return
        store.release_lease(
            session,
            job_id,
            expected_version=version,
            next_attempt_at=_next_poll(rt.settings, submitted_at, now),
        )
