"""One step of a job's life per function, driven by the database, never by a message's content.

Celery tasks (``worker.tasks``) and the periodic tick call these. Each function re-reads the
job, checks that it is still where the step expects it, and moves it with the compare-and-set
``store.transition`` fenced by ``version``. So a message delivered twice does nothing the second
time, and a message lost is made good by the tick, which finds due work in the database:

* :func:`dispatch` claims due ``pending``/``retry_wait`` jobs within the outstanding cap, the
  submit rate and the batch budget, marks them ``submitting`` and hands them to ``submit``.
* :func:`submit` records the exact input it will send, commits, POSTs **once**, and records
  the request id at once. A lost answer makes the job ``submit_unknown`` — never a blind resend.
* :func:`poll` asks fal for the status of due ``queued``/``running`` jobs (batched, with a poll
  interval that grows with the time a job has waited), so no worker slot is held while waiting.
* :func:`download` fetches the result, then the video, then writes the sidecar and finishes.
* :func:`reconcile` drives jobs whose worker died (expired lease) or whose outcome is unknown.

Network calls happen outside database transactions; every write is fenced by the ``version``
read before the call, so a worker paused past its lease cannot overwrite newer state.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from jobs import billing, store
from jobs.endpoints import all_endpoints, get_endpoint
from jobs.errors import (
    AccountLockedError,
    AmbiguousSubmitError,
    FinalProviderError,
    ProviderError,
    RetryableProviderError,
    UsageError,
)
from jobs.models import BatchState, Job, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from worker import chaos, outputs
from worker.fal.client import FalClient
from worker.fal.errors import ResultNotReadyError
from worker.fal.models import RequestHandle, Status
from worker.fal.storage import MediaPreparer, prepare_input
from worker.fal.storage import download as download_file
from worker.limits import LimiterUnavailableError, SubmitLimiter, limiter_for, wait_for_token

log = logging.getLogger(__name__)

S = JobState

#: Lease owner of a ``downloading`` job whose task is queued but not yet running: keeps the tick
#: from queueing it again until the lease expires (which is how a lost message is noticed).
DOWNLOAD_QUEUE = "download-queue"


def worker_identity() -> str:
    """``host:pid:thread``: who holds a lease, for the event log and for fencing."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 100000}"


class RateBucket:
    """A token bucket that paces *dispatch* to the submit rate.

    It is not the limit itself: the POST happens later, in a task on any worker, so the hard
    limit is the shared GCRA taken right before each POST (:mod:`worker.limits`). This bucket,
    in the single tick leader, only keeps dispatch from claiming far more jobs than can be sent
    soon, so submit tasks rarely wait for a token and almost never give a job back.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` whole tokens; returns how many were granted."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted


@dataclass
class Runtime:
    """What a step needs: the database, the fal client, settings, and how to hand work on."""

    engine: Engine
    client: FalClient
    settings: Settings
    enqueue_submit: Callable[[str], None]
    enqueue_download: Callable[[str], None]
    media: MediaPreparer
    owner: str = field(default_factory=worker_identity)
    bucket: RateBucket | None = None
    limiter: SubmitLimiter | None = None

    def __post_init__(self) -> None:
        if self.bucket is None:
            self.bucket = RateBucket(self.settings.submit_rate / (1 + self.settings.submit_jitter_allowance))
        if self.limiter is None:
            self.limiter = limiter_for(self.settings)

    def lease_until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.lease_seconds)


def _handle(job: Job, queue_url: str) -> RequestHandle:
    assert job.request_id is not None
    if job.status_url and job.response_url and job.cancel_url:
        return RequestHandle(job.endpoint, job.request_id, job.status_url, job.response_url, job.cancel_url)
    return RequestHandle.from_request_id(queue_url, job.endpoint, job.request_id)


def _backoff(settings: Settings, attempt: int) -> float:
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


# --------------------------------------------------------------------------- dispatch


def dispatch(rt: Runtime) -> list[str]:
    """Claim due jobs within the caps and budget, mark them ``submitting``; returns their ids.

    The budget is checked in the same transaction that claims: a job's estimate counts as
    reserved from the moment it is ``submitting``, so the cap holds even with many in flight.
    """
    now = utcnow()
    sent: list[str] = []
    with store.session_scope(rt.engine) as session:
        free = rt.settings.max_outstanding - store.count_in_states(session, JobState_at_provider())
        if free <= 0:
            return []
        assert rt.bucket is not None
        free = rt.bucket.take(free)
        if free <= 0:
            return []
        jobs = _claim_within_caps(session, rt, free, now)
        unused = free
        for job in jobs:
            refusal = _budget_refusal(session, rt, job, now)
            if refusal is not None:
                store.transition(
                    session,
                    job.id,
                    job.state,
                    S.CANCELLED,
                    expected_version=job.version,
                    reason="budget",
                    worker=rt.owner,
                    error=refusal,
                    error_type="budget",
                )
                continue
            moved = store.transition(
                session,
                job.id,
                job.state,
                S.SUBMITTING,
                expected_version=job.version,
                reason=f"attempt {job.attempts + 1}",
                worker=rt.owner,
                attempts=job.attempts + 1,
                submitted_input=None,
                lease_owner=rt.owner,
                lease_expires_at=rt.lease_until(now),
            )
            if moved:
                sent.append(job.id)
                unused -= 1
    if unused > 0 and rt.bucket is not None:
        rt.bucket.tokens += unused  # claimed fewer than granted: give the rate back
    for job_id in sent:
        rt.enqueue_submit(job_id)
    return sent


def _claim_within_caps(session: Any, rt: Runtime, free: int, now: datetime) -> list[Job]:
    """Claim up to ``free`` due jobs, no endpoint beyond its own cap (``max_outstanding_per_endpoint``)."""
    claim: dict[str, Any] = {
        "states": [S.PENDING, S.RETRY_WAIT],
        "now": now,
        "owner": rt.owner,
        "lease_seconds": rt.settings.lease_seconds,
        "active_batches_only": True,
    }
    caps = rt.settings.max_outstanding_per_endpoint
    if not caps:
        return store.claim_jobs(session, limit=free, **claim)
    outstanding = store.count_in_states_by_endpoint(session, JobState_at_provider())
    jobs: list[Job] = []
    for endpoint, cap in sorted(caps.items()):
        room = min(free - len(jobs), cap - outstanding.get(endpoint, 0))
        if room > 0:
            jobs += store.claim_jobs(session, limit=room, endpoints=[endpoint], **claim)
    uncapped = [e.id for e in all_endpoints() if e.id not in caps]
    if free - len(jobs) > 0 and uncapped:
        jobs += store.claim_jobs(session, limit=free - len(jobs), endpoints=uncapped, **claim)
    return jobs


def _budget_refusal(session: Any, rt: Runtime, job: Job, now: datetime) -> str | None:
    """Why submitting ``job`` would cross a budget cap (its batch's, or the day's), else None.

    Checked in the claim's transaction, by the single dispatcher: what is committed (spent +
    the estimates of everything in flight) plus this job's estimate must stay within the cap.
    """
    batch = store.get_batch(session, job.batch_id)
    if batch.budget_max_usd is not None:
        money = store.batch_money(session, batch.id)
        if money.committed_usd + job.est_usd > batch.budget_max_usd:
            return (
                f"budget: submitting would commit ${money.committed_usd + job.est_usd:.2f} "
                f"of the batch's ${batch.budget_max_usd:.2f} cap"
            )
    cap = rt.settings.daily_budget_usd
    if cap is not None:
        since = now.replace(hour=0, minute=0, second=0, microsecond=0)
        committed = store.committed_usd_since(session, since)
        if committed + job.est_usd > cap:
            return (
                f"budget: submitting would commit ${committed + job.est_usd:.2f} of today's "
                f"${cap:.2f} cap (WANBATCH_DAILY_BUDGET_USD)"
            )
    return None


def JobState_at_provider() -> list[JobState]:
    """States that count against the outstanding cap."""
    return [s for s in JobState if s.at_provider]


# --------------------------------------------------------------------------- submit


#: How long a job given back for lack of a limiter waits before it is dispatched again.
LIMITER_DOWN_RETRY_SECONDS = 5.0


def _take_submit_token(rt: Runtime, endpoint: str) -> tuple[str, float] | None:
    """None when the submit may go now; else why not and how long until the job is due again.

    Waits in place for a token up to ``submit_wait_max`` (dispatch paces itself to the same
    rate, so waits are short); beyond that the job goes back to ``pending`` rather than hold a
    worker slot. An unreachable limiter fails closed: nothing is sent until it is back.
    """
    assert rt.limiter is not None
    try:
        wait = wait_for_token(rt.limiter, endpoint, rt.settings.submit_wait_max)
    except LimiterUnavailableError as exc:
        log.warning("not submitting: %s", exc)
        return f"held back: {exc}", LIMITER_DOWN_RETRY_SECONDS
    if wait > 0:
        return f"held back by the submit rate for {wait:.2f}s", wait
    return None


def webhook_for(settings: Settings, job_id: str, attempt: int) -> str | None:
    """The ``fal_webhook`` URL for one attempt: the receiver learns which job and attempt a
    completion belongs to even when the submit's answer never reached us."""
    if not settings.webhook_url:
        return None
    parts = httpx.URL(settings.webhook_url)
    return str(parts.copy_merge_params({"job_id": job_id, "attempt": str(attempt)}))


def _retry_or_fail(
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
        delay = _backoff(rt.settings, job.attempts)
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


def submit(rt: Runtime, job_id: str) -> str:
    """Send one claimed job to fal, exactly once. Returns what happened, for logs and tests."""
    with store.session_scope(rt.engine) as session:
        job = store.get_job(session, job_id)
        if job.state != S.SUBMITTING or job.submitted_input is not None:
            return "skipped"  # a duplicate message, or another worker already began this POST
        endpoint, raw_input, version, attempt = job.endpoint, dict(job.input), job.version, job.attempts

    spec = get_endpoint(endpoint)
    try:
        to_send = prepare_input(raw_input, [f.name for f in spec.media_fields], preparer=rt.media)
    except UsageError as exc:  # a local file vanished or changed since validation
        with store.session_scope(rt.engine) as session:
            store.transition(
                session, job_id, S.SUBMITTING, S.FAILED, expected_version=version,
                reason=str(exc), worker=rt.owner, error=str(exc), error_type="input_file",
            )  # fmt: skip
        return "media-failed"
    except ProviderError as exc:
        with store.session_scope(rt.engine) as session:
            job = store.get_job(session, job_id)
            if isinstance(exc, RetryableProviderError):
                _retry_or_fail(session, rt, job, S.SUBMITTING, version, exc, utcnow())
            else:
                store.transition(
                    session, job_id, S.SUBMITTING, S.FAILED, expected_version=version,
                    reason=describe(exc), worker=rt.owner, error=describe(exc), error_type=exc.error_type,
                )  # fmt: skip
        return "media-failed"

    # The global submit rate, taken right before the POST (every worker shares it). Before
    # take_lease on purpose: a worker that dies while waiting leaves a job that is plainly
    # "not sent" (no recorded input), not one whose submission looks ambiguous.
    held_back = _take_submit_token(rt, endpoint)
    if held_back is not None:
        reason, delay = held_back
        with store.session_scope(rt.engine) as session:
            job = store.get_job(session, job_id)
            store.transition(
                session, job_id, S.SUBMITTING, S.PENDING, expected_version=version,
                reason=reason, worker=rt.owner, attempts=max(0, job.attempts - 1),
                lease_owner=None, lease_expires_at=None, next_attempt_at=utcnow() + timedelta(seconds=delay),
            )  # fmt: skip
        return "rate-limited"

    # Record what we are about to send, and that the POST may go out, before it does: if this
    # process dies from here on, the reconciler knows the submit's outcome is unknown.
    # take_lease bumps the version: of two copies of this message, exactly one gets here.
    with store.session_scope(rt.engine) as session:
        taken = store.take_lease(
            session,
            job_id,
            owner=rt.owner,
            expected_version=version,
            now=utcnow(),
            lease_seconds=rt.settings.lease_seconds,
            submitted_input=to_send,
        )
    if taken is None:
        return "lost-lease"
    version = taken

    chaos.crash_point("before_post")
    try:
        submitted = rt.client.submit(endpoint, to_send, webhook_url=webhook_for(rt.settings, job_id, attempt))
    except AmbiguousSubmitError as exc:
        with store.session_scope(rt.engine) as session:
            store.transition(
                session,
                job_id,
                S.SUBMITTING,
                S.SUBMIT_UNKNOWN,
                expected_version=version,
                reason=f"submit outcome unknown: {exc}",
                worker=rt.owner,
                error=f"submission outcome unknown: {exc}",
                error_type="submit_unknown",
                next_attempt_at=utcnow() + timedelta(seconds=rt.settings.submit_unknown_deadline),
                lease_owner=None,
                lease_expires_at=None,
            )
        return "ambiguous"
    except AccountLockedError as exc:
        with store.session_scope(rt.engine) as session:
            job = store.get_job(session, job_id)
            store.set_batch_state(session, job.batch_id, BatchState.PAUSED, reason=describe(exc))
            store.transition(
                session, job_id, S.SUBMITTING, S.PENDING, expected_version=version,
                reason=f"batch paused: {describe(exc)}", worker=rt.owner,
                attempts=max(0, job.attempts - 1), lease_owner=None, lease_expires_at=None,
            )  # fmt: skip
        return "account-locked"
    except RetryableProviderError as exc:
        with store.session_scope(rt.engine) as session:
            job = store.get_job(session, job_id)
            _retry_or_fail(session, rt, job, S.SUBMITTING, version, exc, utcnow())
        return "retry"
    except FinalProviderError as exc:
        with store.session_scope(rt.engine) as session:
            store.transition(
                session, job_id, S.SUBMITTING, S.FAILED, expected_version=version,
                reason=describe(exc), worker=rt.owner, error=describe(exc), error_type=exc.error_type,
            )  # fmt: skip
        return "failed"

    chaos.crash_point("after_post")
    now = utcnow()
    fields: dict[str, Any] = {
        "request_id": submitted.request_id,
        "gateway_request_id": submitted.gateway_request_id,
        "status_url": submitted.status_url,
        "response_url": submitted.response_url,
        "cancel_url": submitted.cancel_url,
        "submitted_at": now,
        "next_attempt_at": now + timedelta(seconds=rt.settings.poll_min_interval),
        "lease_owner": None,
        "lease_expires_at": None,
        "error": None,
        "error_type": None,
    }
    new_state = S.RUNNING if submitted.status == "IN_PROGRESS" else S.QUEUED
    outcome = _while_database_down(
        rt, lambda: _record_submission(rt, job_id, version, new_state, submitted.request_id, fields)
    )
    if outcome == "submitted":
        chaos.crash_point("after_commit")
    return outcome


def _while_database_down(rt: Runtime, action: Callable[[], str]) -> str:
    """Retry ``action`` while the database is unreachable, for a bounded time.

    Used where this process alone knows something fal has already acted on (the request id
    of an accepted, paid submit): giving up at the first dropped connection would turn a
    paid request into "submission outcome unknown". Retries back off to 1 s so the write
    lands within a second of the database returning — before the reconciler's deadline.
    """
    patience = time.monotonic() + max(60.0, rt.settings.lease_seconds + rt.settings.submit_unknown_deadline)
    delay = 0.1
    while True:
        try:
            return action()
        except OperationalError:
            if time.monotonic() > patience:
                raise
            log.warning("database unreachable while recording a submission; retrying in %.1fs", delay)
            time.sleep(delay)
            delay = min(1.0, delay * 2)


def _record_submission(
    rt: Runtime, job_id: str, version: int, new_state: JobState, request_id: str, fields: dict[str, Any]
) -> str:
    """Store the request id fal gave us; ``submitted``, ``submitted-late`` or ``orphaned``."""
    with store.session_scope(rt.engine) as session:
        accepted = store.transition(
            session, job_id, S.SUBMITTING, new_state, expected_version=version,
            reason=f"accepted as {request_id}", worker=rt.owner, **fields,
        )  # fmt: skip
    if accepted:
        return "submitted"
    with store.session_scope(rt.engine) as session:
        job = store.get_job(session, job_id)
        if job.request_id == request_id:  # our commit landed though we saw an error (a retry)
            return "submitted"
        # Our lease ran out while the POST was in flight and the reconciler declared the
        # outcome unknown. We hold the proof: the request exists. Record it.
        if job.state == S.SUBMIT_UNKNOWN and job.request_id is None:
            store.transition(
                session, job_id, S.SUBMIT_UNKNOWN, new_state, expected_version=job.version,
                reason=f"late answer: accepted as {request_id}", worker=rt.owner, **fields,
            )  # fmt: skip
            return "submitted-late"
    log.warning("job %s: fal accepted %s but the job moved on", job_id, request_id)
    return "orphaned"


# --------------------------------------------------------------------------- poll


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
            (j.id, j.version, j.state, _handle(j, rt.settings.fal_queue_url), j.submitted_at) for j in due
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
                    **_billed(job, _cancel_outcome(status)),
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


# --------------------------------------------------------------------------- download


def schedule_downloads(rt: Runtime, limit: int = 200) -> list[str]:
    """Hand due ``downloading`` jobs to download tasks (a lost message is found again here)."""
    now = utcnow()
    with store.session_scope(rt.engine) as session:
        jobs = store.claim_jobs(
            session,
            states=[S.DOWNLOADING],
            limit=limit,
            now=now,
            owner=DOWNLOAD_QUEUE,
            lease_seconds=rt.settings.lease_seconds,
        )
        ids = [j.id for j in jobs]
    for job_id in ids:
        rt.enqueue_download(job_id)
    return ids


def download(rt: Runtime, job_id: str) -> str:
    """Fetch the result and the video of a completed job; never causes a re-generation."""
    now = utcnow()
    with store.session_scope(rt.engine) as session:
        job = store.get_job(session, job_id)
        if job.state != S.DOWNLOADING:
            return "skipped"
        if (
            job.lease_owner not in (None, DOWNLOAD_QUEUE)
            and job.lease_expires_at
            and job.lease_expires_at > now
        ):
            return "busy"  # another worker holds it
        taken = store.take_lease(
            session,
            job_id,
            owner=rt.owner,
            expected_version=job.version,
            now=now,
            lease_seconds=rt.settings.lease_seconds,
        )
        if taken is None:
            return "lost-lease"
        batch = store.get_batch(session, job.batch_id)
        version = taken
        handle = _handle(job, rt.settings.fal_queue_url)
        output = job.provider_output
        item_index, batch_name = job.item_index, batch.name
        download_failures = job.download_attempts

    if output is None:
        try:
            output = rt.client.result(handle)
        except FinalProviderError as exc:
            with store.session_scope(rt.engine) as session:
                job = store.get_job(session, job_id)
                store.transition(
                    session, job_id, S.DOWNLOADING, S.FAILED, expected_version=version,
                    reason=describe(exc), worker=rt.owner, error=describe(exc), error_type=exc.error_type,
                    **_actual_cost_for_failure(job, exc),
                )  # fmt: skip
            return "failed"
        except RetryableProviderError as exc:
            with store.session_scope(rt.engine) as session:
                job = store.get_job(session, job_id)
                if isinstance(exc, ResultNotReadyError):
                    store.release_lease(
                        session, job_id, expected_version=version,
                        next_attempt_at=utcnow() + timedelta(seconds=rt.settings.poll_min_interval),
                    )  # fmt: skip
                    return "not-ready"
                # The model failed in a way fal calls transient: a new attempt is a new request.
                _retry_or_fail(
                    session,
                    rt,
                    job,
                    S.DOWNLOADING,
                    version,
                    exc,
                    utcnow(),
                    **_actual_cost_for_failure(job, exc),
                )
            return "retry"
        with store.session_scope(rt.engine) as session:
            seed = output.get("seed")
            if not store.update_job_fields(
                session,
                job_id,
                expected_version=version,
                provider_output=output,
                seed=int(seed) if isinstance(seed, int) else None,
                actual_prompt=output.get("actual_prompt"),
            ):
                return "lost-lease"

    video = output.get("video") or {}
    url = video.get("url")
    if not isinstance(url, str):
        with store.session_scope(rt.engine) as session:
            store.transition(
                session, job_id, S.DOWNLOADING, S.FAILED, expected_version=version,
                reason="result has no video url", worker=rt.owner,
                error="the provider's result has no video URL", error_type="bad_result",
            )  # fmt: skip
        return "failed"
    dest = outputs.video_path(rt.settings.output_dir, batch_name, item_index, job_id)
    outputs.remove_stale_partials(dest)  # left by a worker killed mid-download; we hold the lease now
    try:
        result = download_file(
            url,
            dest,
            expected_size=video.get("file_size") if isinstance(video.get("file_size"), int) else None,
            max_bytes=rt.settings.download_max_bytes,
            timeout=httpx.Timeout(rt.settings.read_timeout, connect=rt.settings.connect_timeout),
            client=chaos.download_client(httpx.Timeout(rt.settings.read_timeout)),
        )
    except ProviderError as exc:
        failures = download_failures + 1
        with store.session_scope(rt.engine) as session:
            if failures >= rt.settings.download_attempts:
                store.transition(
                    session, job_id, S.DOWNLOADING, S.FAILED, expected_version=version,
                    reason=f"download failed {failures} time(s): {exc}", worker=rt.owner,
                    error=f"download failed {failures} time(s): {exc}", error_type="download_failed",
                    download_attempts=failures,
                )  # fmt: skip
                return "failed"
            store.update_job_fields(
                session,
                job_id,
                expected_version=version,
                download_attempts=failures,
                lease_owner=None,
                lease_expires_at=None,
                next_attempt_at=utcnow() + timedelta(seconds=_backoff(rt.settings, failures)),
            )
        return "download-retry"

    chaos.crash_point("after_download")
    with store.session_scope(rt.engine) as session:
        job = store.get_job(session, job_id)
        sidecar = sidecar_record(
            job, batch_name, result.path, result.sha256, result.size, rt.settings.output_dir
        )
        outputs.write_json_atomic(outputs.sidecar_path(result.path), sidecar)
        store.transition(
            session, job_id, S.DOWNLOADING, S.SUCCEEDED, expected_version=version,
            reason="downloaded", worker=rt.owner,
            output_path=str(result.path), output_sha256=result.sha256, output_bytes=result.size,
            error=None, error_type=None, **_billed(job, billing.Outcome.SUCCEEDED),
        )  # fmt: skip
    return "succeeded"


def _billed(job: Job, outcome: billing.Outcome) -> dict[str, Any]:
    """The job's actual cost after this attempt ended as ``outcome`` (earlier attempts included)."""
    return billing.billed(
        outcome,
        job.est_billing_units,
        job.est_usd,
        prior_units=job.actual_billing_units,
        prior_usd=job.actual_usd,
    )


def _actual_cost_for_failure(job: Job, exc: ProviderError) -> dict[str, Any]:
    """What fal bills for an attempt that ended in ``exc``: the rule for its outcome class
    (``jobs/billing_rules.yaml``: 5xx never, a 422 only when a runner spent inference time)."""
    return _billed(job, billing.classify_failure(exc.status_code, exc.error_type, job.provider_metrics))


def sidecar_record(
    job: Job, batch_name: str, video: Path, sha256: str, size: int, output_dir: Path
) -> dict[str, Any]:
    """Everything needed to reproduce or audit one output, stored beside it."""
    output = job.provider_output or {}
    return {
        "job_id": job.id,
        "batch": job.batch_id,
        "batch_name": batch_name,
        "item_index": job.item_index,
        "endpoint": job.endpoint,
        "input": job.submitted_input,
        "resolved_input": job.input,
        "seed": output.get("seed"),
        "actual_prompt": output.get("actual_prompt"),
        "request_id": job.request_id,
        "gateway_request_id": job.gateway_request_id,
        "provider_metrics": job.provider_metrics,
        "provider_output": output,
        "submitted_at": job.submitted_at.isoformat() if job.submitted_at else None,
        "completed_at": job.completed_at.isoformat() if job.completed_at else None,
        "billing_units": str(job.est_billing_units),
        "cost_usd": str(job.est_usd),
        "attempts": job.attempts,
        "video_path": outputs.relative_to_output(video, output_dir),
        "video_sha256": sha256,
        "video_bytes": size,
    }


# --------------------------------------------------------------------------- reconcile


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
                        (job.id, job.version, job.state, _handle(job, rt.settings.fal_queue_url))
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


@dataclass
class TickReport:
    """What one tick did (for logs, progress and benchmarks)."""

    reconciled: int = 0
    status_calls: int = 0
    dispatched: int = 0
    downloads: int = 0


def tick(rt: Runtime) -> TickReport:
    """One round of periodic work: reconcile, poll, dispatch, schedule downloads."""
    report = TickReport()
    report.reconciled = reconcile(rt) + cancel_jobs_of_cancelled_batches(rt)
    report.status_calls = poll(rt)
    report.dispatched = len(dispatch(rt))
    report.downloads = len(schedule_downloads(rt))
    return report
