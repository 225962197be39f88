"""Download: fetch a completed job's result, then its video, then write the sidecar and
finish. A paid output is never regenerated.

What a failure leads to, by where it happened:

* fal's own verdict on the request — ``COMPLETED`` with ``error``/``error_type``, or the result's
  ``{detail, error_type}`` body — follows the usual retry classification: only a transient
  failure fal reports (:class:`~worker.fal.errors.RequestFailedError`) submits again. The
  status's verdict stands when the result can no longer be fetched (expired, or its call fails):
  an expired result ends only a request fal reported as successful.
* The result *call* failing (network, gateway 502/503/504, 429, a body that is not JSON) says
  nothing about the request: ask again with backoff while fal keeps the result (1 h after
  completion), then fail with the billed cost. Never a new submission.
* A malformed answer (:class:`~worker.fal.errors.ProviderProtocolError`): asked again at most
  ``WANBATCH_DOWNLOAD_ATTEMPTS`` times, then the job fails with the reason and the billed cost.
* The video download: retried ``WANBATCH_DOWNLOAD_ATTEMPTS`` times; a body that is not a video
  or an expired file fails at once. A host the download policy refuses (not on
  ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS``, or at an internal address) is a setting to change, not
  the file's fault: the job waits and its batch pauses at once, naming the host and the setting
  (:func:`_download_refused`). One attempt lasts at most
  ``WANBATCH_DOWNLOAD_TIMEOUT`` seconds and renews the job's lease while bytes arrive. A host
  that cannot be connected to (:func:`_download_unreached`), or that answers 5xx/429/408 or
  drops the body midway (:func:`_download_troubled`), is no try: the job waits, and after a
  minute its batch pauses until a video is stored again.
* A process that dies once the video is saved but before the job's success is stored: the next
  try takes the file it left (hashed, probed) instead of downloading it again — fal may no
  longer serve it (:func:`_downloaded_before`).
* Writing the output here (disk full, read-only folder): the batch is paused with the reason and
  the job waits for its next run (:func:`_pause_for_outputs`): every job sent meanwhile would be
  paid for and meet the same disk.
* Uploading it to object storage (``WANBATCH_OUTPUT_DIR=s3://…``, :mod:`jobs.output_store`):
  retried like a download, from the staged copy (never a new download or submission), then the
  batch is paused likewise; the staged copy is removed once the success is stored. Its SHA-256
  and size are recorded on the job when an upload fails: should its batch be cancelled meanwhile
  (the job fails ``output_not_kept``, the file kept), a rerun's job takes that very file back
  (:mod:`worker.steps.staged`) and stores it here, without fal (:func:`_take_staged`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import stat
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.orm import Session

from jobs import billing, db, outputs, store
from jobs.errors import (
    AccountLockedError,
    FinalProviderError,
    ProviderError,
    RetryableProviderError,
    StateConflict,
    WanbatchError,
)
from jobs.http_environment import proxy_variables
from jobs.models import BatchState, JobView, utcnow
from jobs.open_files import local_resource_errno, os_errno, out_of_files
from jobs.output_store import OutputStore, OutputUploadError, open_output_store
from jobs.outputs import OutputFolderError, OutputWriteError
from jobs.settings import Settings
from jobs.states import TERMINAL_STATES, JobState
from jobs.store import Fence
from worker import chaos, logs, probe, telemetry
from worker.crash import summary
from worker.fal.errors import (
    DownloadIntegrityError,
    DownloadRefusedError,
    DownloadUnreachedError,
    RequestFailedError,
    ResultExpiredError,
    ResultNotReadyError,
    status_failure,
)
from worker.fal.models import DownloadResult
from worker.fal.results import Video, parse_result
from worker.fal.storage import DownloadPolicy, SharedDownloadClient
from worker.fal.storage import download as download_file
from worker.steps.context import DOWNLOAD_QUEUE, DownloadClaim, Runtime, S, handle_of, in_seconds
from worker.steps.download_reach import CANCELLED_PATIENCE_SECONDS, MEDIA_HORIZON_DAYS
from worker.steps.failures import (
    backoff,
    billed,
    cost_of_failure,
    describe,
    kind_of,
    pause_for_account,
    retry_after,
    settle,
)
from worker.steps.keepalive import HeldLease
from worker.steps.output_writes import Attempt
from worker.steps.staged import find_staged

log = logging.getLogger(__name__)

#: How long fal keeps a completed request's result: 1 h, or 6 min for results of 10 KB or more,
#: longer with payload storage (https://fal.ai/docs/inference-api/queue/result). A Wan result is
#: a few hundred bytes; past the hour a result call can only answer 404, so asking stops there.
RESULT_RETENTION = timedelta(hours=1)


def schedule_downloads(rt: Runtime, limit: int = 200) -> list[str]:
    """Hand due ``downloading`` jobs to download tasks (a lost message is found again here)."""
    now = utcnow()
    with db.session_scope(rt.engine) as session:
        jobs = store.claim_jobs(
            session,
            states=[S.DOWNLOADING],
            limit=limit,
            now=now,
            owner=DOWNLOAD_QUEUE,
            lease_seconds=rt.settings.lease_seconds,
            batch_ids=rt.batch_ids,  # an embedded run downloads its own batch only
            # a simulation's videos are at its simulator: its own --simulate run fetches them;
            # a result at another fal queue, a process of that queue
            exclude_batch_ids=(reach := rt.reach(session)).exclude_batch_ids,
            sent_to=reach.sent_to,
        )
        ids = [j.id for j in jobs]
    for job_id in ids:
        rt.enqueue_download(job_id)
    return ids


#: Outcomes of :func:`download` after which the job no longer waits for its download.
LEFT_BACKLOG = frozenset({"succeeded", "failed", "retry"})
#: Outcomes of :func:`download` after which the job still waits on the media host in this
#: process: any other forgets it there (:meth:`DownloadTrouble.forget`).
STILL_HELD = frozenset({"download-held", "outputs-paused", "download-retry"})


def download(rt: Runtime, job_id: str) -> str:
    """Fetch the result and the video of a completed job; never causes a re-generation.

    Returns what happened (``succeeded``, ``failed``, ``retry``, ``result-retry``,
    ``download-retry``, ``upload-retry``, ``outputs-paused``, ``not-ready``, ``paused``, ``busy``,
    ``skipped``, ``lost-lease``, ``elsewhere``: a request sent to another fal queue, left to a
    process of that queue), for logs and tests.

    A job the conductor of this process leased for its download, in the transaction that
    recorded its completion, comes with its claim (``rt.download_claims``): the step starts
    from it instead of reading the job and taking the lease again.

    A job that leaves the download backlog says so (``rt.notify("downloaded")``): while the
    backlog bound holds submits back, that is what frees the next one.
    """
    outcome = _download(rt, job_id)
    if outcome not in STILL_HELD:
        # Every other way out, in one place: a job that left (stored, failed, its lease refused
        # or taken over, its batch cancelled) and stayed known as waiting kept the outage open
        # ("downloads wait" for ever) and dated the next job's pause from its old failure.
        rt.download_trouble.forget(job_id)
        rt.download_reach.forget(job_id)
    if outcome in LEFT_BACKLOG:
        rt.notify("downloaded", job_id)
    return outcome


def _download(rt: Runtime, job_id: str) -> str:
    handed = rt.download_claims.pop(job_id, None) if rt.download_claims is not None else None
    claim = handed if handed is not None else _claim(rt, job_id)
    if isinstance(claim, str):
        return claim
    if claim.handle is None:  # a rerun's job that took a staged video: nothing to ask fal
        logs.annotate(batch_id=claim.batch_id)
        with rt.output_leases.kept(claim.fence) as held:
            return _take_staged(rt, job_id, claim, held)
    handle = claim.handle
    logs.annotate(batch_id=claim.batch_id, request_id=handle.request_id)
    try:
        if claim.output is None:
            output = rt.client.result(claim.handle)
            video = parse_result(output)
            # Kept with whatever ends this try (one transaction, not two): a process that dies
            # before then leaves the result at fal, where the next try asks for it again.
            fetched = {"provider_output": output, "seed": video.seed, "actual_prompt": video.actual_prompt}
            claim = replace(claim, failures=0, fetched=fetched)
            if rt.other_key(claim.job) is not None:  # answered for this key: the same account's
                with db.session_scope(rt.engine) as session:
                    rt.followed_with_this_key(
                        session, job_id, handle.request_id, getattr(claim.job, "api_key_id", None)
                    )
        else:
            video = parse_result(claim.output)
    except ResultNotReadyError as exc:
        return _result_not_ready(rt, job_id, claim, exc)
    except AccountLockedError as exc:
        if (sent := rt.sent_elsewhere(claim.job)) is not None:  # this key's account, not the request's
            return _not_ours(rt, claim, sent, exc)
        # The account, not the request: the result waits at fal; pause the batch, ask again later.
        telemetry.count_provider_error(exc)
        with db.session_scope(rt.engine) as session:
            reason = pause_for_account(session, rt, claim.batch_id, exc)
            store.release_lease(
                session, claim.fence, next_attempt_at=in_seconds(rt.settings.poll_max_interval)
            )
        log.debug(  # the pause itself is said once, by pause_for_account
            "job %s: result refused for the account; batch paused: %s",
            job_id,
            reason,
            extra={"event": "download.account_refused"},
        )
        return "paused"
    except ResultExpiredError as exc:
        if (sent := rt.sent_elsewhere(claim.job)) is not None:
            return _not_ours(rt, claim, sent, exc)
        return _result_expired(rt, job_id, claim, exc)
    except (RequestFailedError, FinalProviderError) as exc:
        if not isinstance(exc, RequestFailedError) and (sent := rt.sent_elsewhere(claim.job)) is not None:
            return _not_ours(rt, claim, sent, exc)
        return _fal_verdict(rt, job_id, claim, exc)
    except ProviderError as exc:
        return _result_unavailable(rt, job_id, claim, exc)
    # The lease is kept from here until the job's success is stored (or the step gives it back):
    # a download's bytes may arrive slowly, and an upload's answer come late.
    with rt.output_leases.kept(claim.fence) as held, rt.output_writes.attempt(claim.version) as files:
        return _fetch_video(rt, job_id, claim, video, held, files)


def _claim(rt: Runtime, job_id: str) -> DownloadClaim | str:
    now = utcnow()
    with db.session_scope(rt.engine) as session:
        # Read as a row, not an ORM object: a worker claims every download this way (the
        # embedded conductor hands its own a snapshot), and the load was a third of the claim.
        job = store.job_snapshot(session, job_id)
        if job.state != S.DOWNLOADING:
            return "skipped"
        if (
            job.lease_owner not in (None, DOWNLOAD_QUEUE)
            and job.lease_expires_at
            and job.lease_expires_at > now
        ):
            return "busy"  # another worker holds it (and renews it while its download progresses)
        if job.reused_from is None and not rt.simulated and job.fal_origin not in (None, rt.queue_origin):
            # Sent to another fal queue (Runtime.reach): only a process of that queue can
            # fetch its result; asked here, this fal answers 404 and a paid video would end
            # "result expired". Handed here straight (a webhook applied by this process), the
            # job is let go at once, for that queue's download scheduler.
            if job.lease_owner == DOWNLOAD_QUEUE:
                store.release_lease(session, rt.fence(job))
            return "elsewhere"
        taken = store.take_lease(session, rt.fence(job), now=now, lease_seconds=rt.settings.lease_seconds)
        if taken is None:
            return "lost-lease"
        return _claim_of(session, rt, job, taken)


def _claim_of(session: Session, rt: Runtime, job: JobView, fence: Fence) -> DownloadClaim:
    return DownloadClaim(
        fence=fence,
        # None for a job that took a staged video (reused_from, never sent): no request at fal
        handle=None if job.reused_from is not None else handle_of(job, rt.settings.fal_queue_url),
        output=job.provider_output,
        item_index=job.item_index,
        batch_id=job.batch_id,
        batch_name=_batch_name(session, job.batch_id),
        parent_batch=_parent_batch(session, job.batch_id),
        failures=job.download_attempts,
        completed_at=job.completed_at,
        job=job,
    )


def handed_claim(
    session: Session, rt: Runtime, job_id: str, job: JobView | None = None
) -> DownloadClaim | None:
    """The claim of a job just moved to ``downloading`` and leased to ``rt.owner`` in ``session``
    (by the conductor, which hands the download to a thread of this process once it commits).
    ``job``: the job as it stands after that move, when the caller read it
    (:func:`jobs.store.job_snapshots`).

    The lease is this process's from that very move, fenced by its version: no second read and
    no second lease are needed — the step's writes are all fenced by it. None when the job is
    not so (the download step then claims it as usual).
    """
    job = job if job is not None else store.get_job(session, job_id)
    if job.state != S.DOWNLOADING or job.lease_owner != rt.owner:
        return None
    return _claim_of(session, rt, job, rt.fence(job))


#: Batch id → (the name its outputs are filed under, :func:`jobs.store.folder_name`; the batch it
#: was rerun from). Neither changes, even when a simulation is renamed to make room for a batch
#: for fal: read once per batch, not per download.
_BATCHES: dict[str, tuple[str, str | None]] = {}


def _batch_facts(session: Session, batch_id: str) -> tuple[str, str | None]:
    facts = _BATCHES.get(batch_id)
    if facts is None:
        if len(_BATCHES) > 1024:
            _BATCHES.clear()
        batch = store.get_batch(session, batch_id)
        facts = _BATCHES[batch_id] = (store.folder_name(batch), batch.parent_batch_id)
    return facts


def _batch_name(session: Session, batch_id: str) -> str:
    return _batch_facts(session, batch_id)[0]


def _parent_batch(session: Session, batch_id: str) -> str | None:
    """The batch ``batch_id`` was rerun from (``parent_batch_id``), else None: the sidecar's
    ``parent_batch``."""
    return _batch_facts(session, batch_id)[1]


def _status_verdict(session: Session, job_id: str) -> ProviderError | None:
    """fal's error from the ``COMPLETED`` status that moved the job to ``downloading`` (poll
    records ``error``/``error_type`` on that event), or None when fal reported none."""
    entered = next(  # the move itself, not a note written while downloading (store.note_request)
        (
            e
            for e in reversed(store.job_events(session, job_id))
            if e.to_state == S.DOWNLOADING and e.from_state != S.DOWNLOADING
        ),
        None,
    )
    details = entered.details if entered is not None else None
    if not isinstance(details, dict):
        return None
    error, error_type = details.get("error"), details.get("error_type")
    if not error and not error_type:
        return None
    return status_failure(
        error if isinstance(error, str) else None, error_type if isinstance(error_type, str) else None
    )


def _not_ours(rt: Runtime, claim: DownloadClaim, sent: str, exc: ProviderError) -> str:
    """fal said "not found" about the result of a request ``sent`` with another API key, or of a
    simulation's request another live process's simulator accepted: no proof the result is gone
    (a key of another account is told another account's request does not exist; a simulator
    knows only its own). The job keeps waiting for its download, asked about again after the
    longest poll interval, until a process that can ask about it (with the key it was sent with;
    the process of that simulator) fetches it."""
    telemetry.count_provider_error(exc)
    first = True
    if claim.handle is not None and (key := rt.other_key(claim.job)) is not None:
        first = rt.key_refused(claim.fence.job_id, claim.handle.request_id, key)
    log.log(
        logging.WARNING if first else logging.DEBUG,  # said once, at debug level after
        "job %s: fal answered %s about its result, %s: not taken as final; waiting for a process "
        "that can ask about it",
        claim.fence.job_id,
        exc,
        sent,
        extra={"event": "download.other_key"},
    )
    with db.session_scope(rt.engine) as session:
        store.release_lease(session, claim.fence, next_attempt_at=in_seconds(rt.settings.poll_max_interval))
    return "result-retry"


#: What the download step's line says when fal's result (or status) said the request failed: a
#: model error, or a request fal refused (``content_policy_violation``); no video to download.
RENDER_FAILED = "fal's result: the render failed"


def _fal_verdict(rt: Runtime, job_id: str, claim: DownloadClaim, exc: ProviderError) -> str:
    """fal itself said the request failed: the usual retry classification (a new attempt is a
    new request, and only a :class:`RequestFailedError` gets one). Returns what
    :func:`~worker.steps.failures.settle` did (``retry``, or ``failed`` on the last attempt).
    No download was tried: the step's line says the render failed, not the download."""
    logs.note_what_failed(RENDER_FAILED)
    with db.session_scope(rt.engine) as session:
        job = store.get_job(session, job_id)
        return settle(session, rt, claim.fence, exc, **cost_of_failure(job, exc))


def _result_expired(rt: Runtime, job_id: str, claim: DownloadClaim, exc: ResultExpiredError) -> str:
    """fal no longer keeps the result (a 404 without an error type): it speaks of the result, not
    of the request. For a request whose ``COMPLETED`` status carried fal's error, that verdict
    decides the retry and the cost, as it would had the result replayed it — a runner that
    disconnected is tried again, unbilled, however long the run was interrupted. Only for a
    request fal reported as successful is the expiry itself the end of the job: fal made that
    video and billed it, so the job carries the cost of a success (:func:`_fail_paid`), whether
    or not the status reported run-time metrics."""
    telemetry.count_provider_error(exc)
    if (decided := _by_fal_verdict(rt, job_id, claim)) is not None:
        return decided
    with db.session_scope(rt.engine) as session:
        return _fail_paid(session, claim, error=describe(exc), error_type=kind_of(exc) or "result_expired")


def _result_unavailable(rt: Runtime, job_id: str, claim: DownloadClaim, exc: ProviderError) -> str:
    """The result call failed, or answered something malformed: ask again later, never resubmit.

    fal said COMPLETED, so the video exists and is billed. A transport or gateway failure of the
    call is retried while fal keeps the result (:data:`RESULT_RETENTION` after completion); a
    malformed answer at most ``WANBATCH_DOWNLOAD_ATTEMPTS`` times. Then the job fails with the
    reason and the billed cost. When the status already carried fal's error, that verdict
    decides at once (the result would only have added detail).
    """
    telemetry.count_provider_error(exc)
    if (decided := _by_fal_verdict(rt, job_id, claim)) is not None:
        return decided
    failures = claim.failures + 1
    now = utcnow()
    protocol = not isinstance(exc, RetryableProviderError)
    past_retention = claim.completed_at is not None and now >= claim.completed_at + RESULT_RETENTION
    exhausted = failures >= rt.settings.download_attempts and (protocol or claim.completed_at is None)
    ended = None
    if past_retention or exhausted:
        ended = "fal no longer keeps the result" if past_retention and not exhausted else "giving up"
    return _ask_again_or_fail(
        rt,
        job_id,
        claim,
        exc,
        failures=failures,
        now=now,
        ended=ended,
        error="could not get fal's result",
        error_type="provider_protocol_error" if protocol else "result_unavailable",
        waiting="not fetched",
        min_delay=0.0,
        outcome="result-retry",
    )


def _result_not_ready(rt: Runtime, job_id: str, claim: DownloadClaim, exc: ResultNotReadyError) -> str:
    """The result call answered "not finished yet" for a request fal's status called COMPLETED.

    When that status carried fal's error, the answer is the failure replayed in other words
    (fal: a failed request's result "returns the same error"; e.g. 400 "Video generation not
    completed: output flagged by the safety checker"): fal's verdict decides at once, as for
    an expired result (:func:`_fal_verdict`). Otherwise the result may still be on its way: ask
    again with backoff, each answer counted in ``download_attempts``; after
    ``WANBATCH_DOWNLOAD_ATTEMPTS`` of them, or once fal no longer keeps the result
    (:data:`RESULT_RETENTION` after completion), the job fails with the billed cost instead of
    asking for ever.
    """
    if (decided := _by_fal_verdict(rt, job_id, claim)) is not None:
        telemetry.count_provider_error(exc)
        return decided
    failures = claim.failures + 1
    now = utcnow()
    past_retention = claim.completed_at is not None and now >= claim.completed_at + RESULT_RETENTION
    ended = None
    if past_retention or failures >= rt.settings.download_attempts:
        ended = "fal no longer keeps the result" if past_retention else "giving up"
    return _ask_again_or_fail(
        rt,
        job_id,
        claim,
        exc,
        failures=failures,
        now=now,
        ended=ended,
        error="fal's result still not ready though its status said COMPLETED",
        error_type="result_unavailable",
        waiting="not ready",
        min_delay=rt.settings.poll_min_interval,
        outcome="not-ready",
    )


def _by_fal_verdict(rt: Runtime, job_id: str, claim: DownloadClaim) -> str | None:
    """The job ended by fal's own verdict when its COMPLETED status carried fal's error
    (:func:`_status_verdict`, :func:`_fal_verdict`): what a result call that failed would only
    have said again. None: the status said nothing against it."""
    with db.read_scope(rt.engine) as session:
        verdict = _status_verdict(session, job_id)
    return None if verdict is None else _fal_verdict(rt, job_id, claim, verdict)


def _ask_again_or_fail(
    rt: Runtime,
    job_id: str,
    claim: DownloadClaim,
    exc: ProviderError,
    *,
    failures: int,
    now: datetime,
    ended: str | None,
    error: str,
    error_type: str,
    waiting: str,
    min_delay: float,
    outcome: str,
) -> str:
    """A result call that did not give the result: the job fails with the billed cost when
    ``ended`` says why it stops asking (``error (N tries, ended): what fal said``), else its
    lease is given back to ask again after the backoff (at least ``min_delay``, and any
    ``Retry-After``), the try counted in ``download_attempts``. ``outcome`` is the step's answer."""
    with db.session_scope(rt.engine) as session:
        if ended is not None:
            return _fail_paid(
                session,
                claim,
                error=f"{error} ({failures} tries, {ended}): {describe(exc)}",
                error_type=error_type,
                download_attempts=failures,
                provider_output=None,
            )
        delay = max(min_delay, backoff(rt.settings, failures), retry_after(rt.settings, exc))
        log.info(
            "job %s: result %s (%s); asking again in %.0fs",
            job_id,
            waiting,
            exc,
            delay,
            extra={"event": "download.result_retry"},
        )
        store.release_lease(
            session,
            claim.fence,
            next_attempt_at=now + timedelta(seconds=delay),
            download_attempts=failures,
            provider_output=None,
        )
    return outcome


class _LeaseKeeper:
    """Renews the job's lease while its video streams in (called for every chunk, writes at most
    every third of the lease). Without it a download longer than ``WANBATCH_LEASE_SECONDS`` was
    taken over by a second task mid-stream. A renewal that finds the lease gone (fenced by the
    version) raises :class:`StateConflict`, which aborts this download: someone else owns it."""

    def __init__(self, rt: Runtime, fence: Fence) -> None:
        self._rt, self._fence = rt, fence
        self._every = rt.settings.lease_seconds / 3
        self._last = time.monotonic()

    def __call__(self, _bytes_so_far: int) -> None:
        self._rt.output_writes.check(self._fence.job_id)  # the run stops: no more bytes written
        if time.monotonic() - self._last < self._every:
            return
        self._last = time.monotonic()
        with db.session_scope(self._rt.engine) as session:
            kept = store.extend_lease(
                session, self._fence, now=utcnow(), lease_seconds=self._rt.settings.lease_seconds
            )
        if not kept:
            raise StateConflict(f"job {self._fence.job_id}: the lease was lost during the download")


def _mid_download(_response: httpx.Response) -> None:
    chaos.crash_point("mid_download")  # headers in, temporary file created, body not yet read


def download_policy(settings: Settings) -> DownloadPolicy:
    """Where this deployment's outputs may come from (the fal URLs' origins are always allowed),
    never by a URL holding FAL_KEY."""
    key = settings.fal_key.get_secret_value() if settings.fal_key is not None else ""
    proxy = settings.download_proxy.get_secret_value() if settings.download_proxy is not None else None
    return DownloadPolicy.for_urls(
        [settings.fal_queue_url, settings.fal_rest_url], settings.download_allowed_hosts, (key,), proxy
    )


def _timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)


#: The download client of each live runtime, by ``id(runtime)`` (a Runtime is not hashable); an
#: entry goes when its runtime is closed (:func:`close_download_client`) or collected.
_download_clients: dict[int, SharedDownloadClient] = {}
_download_clients_lock = threading.Lock()


def download_client(rt: Runtime) -> SharedDownloadClient:
    """The runtime's one guarded download client (made on first use), shared by its threads so
    that downloads reuse connections to the CDN (see :class:`SharedDownloadClient`)."""
    key = id(rt)
    with _download_clients_lock:
        shared = _download_clients.get(key)
        if shared is None:
            shared = SharedDownloadClient(download_policy(rt.settings), _timeout(rt.settings))
            _download_clients[key] = shared
            # The runtime's memory cannot be reused (nor its id) before this runs.
            weakref.finalize(rt, _discard_download_client, key)
        return shared


def close_download_client(rt: Runtime) -> None:
    """Close the runtime's download client, if it made one (``worker.runtime.close_runtime``)."""
    _discard_download_client(id(rt))


def _discard_download_client(key: int) -> None:
    # No lock: this also runs from a finalizer, possibly while this thread holds the lock;
    # dict.pop is atomic.
    shared = _download_clients.pop(key, None)
    if shared is not None:
        shared.close()


def _fetch_video(
    rt: Runtime, job_id: str, claim: DownloadClaim, video: Video, held: HeldLease, files: Attempt
) -> str:
    """Download (or find already downloaded: :func:`_downloaded_before`), probe, then store the
    output. ``files``: where it writes, for a run that stops meanwhile (:mod:`worker.steps.output_writes`)."""
    settings = rt.settings
    outs = open_output_store(settings)
    try:
        # The batch's folder resolved outside the output folder, or the folder cannot be resolved
        # (its working folder removed): as any folder that cannot take outputs, never a bug.
        dest = outs.video_dest(claim.batch_name, claim.item_index, job_id)
    except OutputWriteError as exc:
        return _write_failed(rt, job_id, claim, exc)
    request_id = claim.handle.request_id if claim.handle is not None else None
    if not outs.is_remote and request_id is not None:
        # A paid video of another request under the job's name stays: this one goes beside it.
        # (In S3 the upload's conditional write finds it: S3OutputStore.publish.)
        dest = _own_name(job_id, dest, request_id)
    files.add(dest)
    try:
        # debris of attempts that are over (temporary files of downloads and sidecars): never
        # the file of a download that holds the job
        outputs.remove_stale_partials(
            dest,
            older_than=settings.lease_seconds,
            version=claim.version,
            # the sidecar on its way of a try frozen while storing there is not debris
            storing=None if outs.is_remote else functools.partial(_being_stored, dest),
        )
    except OSError as exc:
        failed = OutputWriteError(f"could not clean up {dest.parent}: {exc.strerror or exc}")
        failed.__cause__ = exc  # what it was (out of file descriptors, a full disk) is told by its errno
        return _write_failed(rt, job_id, claim, failed)
    with _StoringHold(local=not outs.is_remote) as hold:
        result = _downloaded_before(
            job_id,
            dest,
            video,
            claim.job.submitted_at,
            claim.job.earlier_items,
            staged=outs.is_remote,
            request_id=request_id,
        )
        # A video staged by an earlier try may be stored already: that try lost its lease after
        # the upload (a storage answering slowly), and what is stored is not sent again.
        stored_before = result is not None and outs.is_remote
        if result is None:
            occupied = None if outs.is_remote or request_id is None else _occupied(job_id, request_id)
            fetched = _download_video(rt, job_id, claim, video, dest, occupied, placing=hold.take_open)
            if isinstance(fetched, str):
                return fetched
            result = fetched
        # where the video went: ``dest``, or beside it when another request's took the name meanwhile
        dest = result.path
        files.add(dest)  # its sidecar's temporary file goes beside it
        hold.take(dest)  # held already when this download put it there
        return _store_video(rt, job_id, claim, outs, dest, result, held=held, stored_before=stored_before)


class _StoringHold:
    """While a video renamed into a local output folder is probed and its sidecar written, a
    shared ``flock`` on it: another process finding it there without its sidecar then knows it
    is being stored, not left by a try that died (:func:`_being_stored`). The lock ends with the
    process, whatever ends it. A file system without locks: nothing held.

    A download takes it on its temporary file before that file takes the job's name
    (``download``'s ``placing``: the same inode), so the video is never under the name unheld:
    taken only after the rename, a copy of this database storing the same job at that moment
    found it there, without a sidecar and not held, took it for an earlier try's and recorded
    it as its own — two databases pointing at one video, one sidecar naming the other's request."""

    def __init__(self, *, local: bool) -> None:
        self.local = local
        self.fd: int | None = None

    def take(self, video: Path) -> None:
        """Hold ``video`` (once: a second call holds what the first one did)."""
        if not self.local or self.fd is not None:
            return
        try:
            fd = os.open(video, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return
        self._lock(fd)

    def take_open(self, fd: int) -> None:
        """Hold the file open at ``fd`` (the download's own, closed after this: held through a
        ``dup`` of it, the same open file whose lock lasts until its last descriptor closes)."""
        if not self.local or self.fd is not None:
            return
        try:
            held = os.dup(fd)
        except OSError:  # out of descriptors: taken by name once placed (``take``), as before
            return
        self._lock(held)

    def _lock(self, fd: int) -> None:
        self.fd = fd
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_SH)

    def __enter__(self) -> _StoringHold:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _being_stored(video: Path) -> bool:
    """Whether another process holds ``video`` while it stores it (:func:`_storing`): then it is
    that process's, never an earlier try's of this job to take."""
    try:
        fd = os.open(video, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system: nothing tells
        return False
    finally:
        os.close(fd)  # closing it releases the lock taken
    return False


def _own_name(job_id: str, dest: Path, request_id: str) -> Path:
    """Where the video of fal's request ``request_id`` is stored in a local output folder: the
    job's own name ``dest``, unless the sidecar there names another request — a paid video that
    another copy of this database (or a newer backup of it, or an earlier request of the job)
    stored. That pair is never replaced: this one goes beside it
    (:func:`jobs.outputs.beside_path`), with one warning. One failed ``open`` when there is
    none (the usual case)."""
    record = outputs.read_sidecar(dest)
    if record is None or record.get("request_id") == request_id:
        return dest
    beside = outputs.beside_path(dest, request_id)
    _say_kept(job_id, dest, beside, request_id, record)
    return beside


def _occupied(job_id: str, request_id: str) -> Callable[[Path], Path]:
    """``download``'s choice when the job's name holds a file as the video is renamed into
    place: the video of this very request (its sidecar names it: an earlier try's) is replaced
    (the same bytes), anything else is kept and this one goes beside it — a video without its
    sidecar is another request's, or another process's storing it at this moment."""

    def place(dest: Path) -> Path:
        record = outputs.read_sidecar(dest)
        if record is not None and record.get("request_id") == request_id:
            return dest
        beside = outputs.beside_path(dest, request_id)
        if beside != dest:
            _say_kept(job_id, dest, beside, request_id, record)
        return beside

    return place


def _say_kept(job_id: str, dest: Path, beside: Path, request_id: str, record: dict[str, Any] | None) -> None:
    """The warning of a paid video kept under the job's name while this request's goes beside it."""
    other = record.get("request_id") if record is not None else None
    if record is None:
        what = (
            f"{dest.name} is already there without its sidecar (another request's video, or another "
            "process storing it now)"
        )
    elif record.get("job_id") == job_id:
        what = (
            f"{dest.name} holds the video of request {other}, which this database does not record for the "
            f"job (it records {request_id}): another copy of this database, or a newer backup, already "
            "stored it (or an earlier request of the job did)"
        )
    else:
        what = f"{dest.name} holds the video of job {record.get('job_id')}, request {other}"
    log.warning(
        "job %s: %s; not overwritten: this request's video is stored beside it as %s",
        job_id,
        what,
        beside.name,
        extra={"event": "download.kept_other_request", "job_id": job_id, "request_id": request_id},
    )


def _store_video(
    rt: Runtime,
    job_id: str,
    claim: DownloadClaim,
    outs: OutputStore,
    dest: Path,
    result: DownloadResult,
    *,
    held: HeldLease,
    maker: JobView | None = None,
    taken: Path | None = None,
    stored_before: bool = False,
) -> str:
    """Probe the video in ``result``, then store it with its sidecar and record the success.

    ``maker`` and ``taken``: a rerun's job storing the paid video its original left staged, at
    ``taken`` (:func:`_take_staged`); ``maker`` is the job fal made it for, whose request the
    sidecar describes. That file is removed once the success is stored (as a staged copy is).
    ``stored_before``: an earlier try may have stored the output already (``publish``).

    ``held``: the job's lease as ``rt.output_leases`` keeps it (renewed every third of a lease
    by one thread of the runtime) until the step ends: an upload waits on the storage's answer,
    which may come later than ``WANBATCH_LEASE_SECONDS`` — the job was then taken over by
    another try, which uploaded it again, and again (:func:`_stored_late`)."""
    chaos.crash_point("after_download")
    job = claim.job  # detached: setting what was fetched writes nothing
    for name, value in claim.fetched.items():
        setattr(job, name, value)
    checked = _check_media(rt, job_id, claim, job, result.path, walked=result.whole)
    if isinstance(checked, str):
        return checked
    location, shown = outs.placement(dest, claim.batch_name, claim.item_index, job_id)
    if maker is None:
        cost = billed(job, billing.Outcome.SUCCEEDED)
        sidecar = sidecar_record(job, claim.batch_name, shown, result.sha256, result.size, cost)
    else:
        cost = nothing_more(job)
        sidecar = taken_sidecar(maker, job, claim.batch_name, shown, result.sha256, result.size)
    # Lineage, the job's own (a taken video's too): which parent job and batch a rerun repeats.
    sidecar.update(rerun_of=job.rerun_of, parent_batch=claim.parent_batch)
    sidecar.update(checked)
    started = time.monotonic()
    # What the video is stored on (the job's completion at fal, committed without a sync of its
    # own: jobs.store.mark_completed) is on disk before the video is under its final name.
    db.sync_commits(rt.engine)
    try:
        output_path = outs.publish(
            result.path,
            location=location,
            sha256=result.sha256,
            size=result.size,
            sidecar=sidecar,
            progress=_still_held(held),
            temp_tag=outputs.partial_tag(claim.version),
            holds_lease=lambda: _holds_lease(rt, held),
            stored_before=stored_before,
        )
    except StateConflict:
        # the staged file stays: the lease's new holder uploads it (or finds it stored)
        return _stored_late(rt, job_id, claim, outs, time.monotonic() - started, stored=False)
    except OutputUploadError as exc:
        return _upload_failed(rt, job_id, claim, exc, result)
    except OutputWriteError as exc:
        return _write_failed(rt, job_id, claim, exc)
    resumed = False
    # The success needs no sync of its own when nothing is removed once it is stored (a local
    # folder's video, no staged copy taken): lost to a power cut, the job takes the saved video
    # again, without a download (README: "A run killed after a video was saved"); `run` syncs
    # before it reports (jobs.db.sync_log). A copy removed after it (S3's staged video, a
    # taken one) must not go before the success is on disk.
    removes = outs.is_remote or taken is not None
    with db.session_scope(rt.engine) as session:
        with contextlib.nullcontext() if removes else db.covered(session):
            stored = store.mark_succeeded(
                session,
                claim.fence,
                output_path=output_path,
                output_sha256=result.sha256,
                output_bytes=result.size,
                **claim.fetched,
                **checked,
                **cost,
            )
        # A job tried again (a full disk held it back, or a download failed) is the one whose
        # success may end its batch's pause for outputs: there is room again.
        if stored and claim.job.next_attempt_at is not None:
            resumed = store.resume_after_outputs_stored(session, claim.batch_id)
            with _UNSTORED_SAID:  # stored again: its next trouble is news
                rt.outputs_unstored_said.discard(claim.batch_id)
    if not stored:  # the lease moved on meanwhile: the job is its new holder's to finish
        if not outs.is_remote:
            _withdraw_if_stored_elsewhere(rt, job_id, Path(output_path), sidecar, result.sha256)
        return _stored_late(rt, job_id, claim, outs, time.monotonic() - started, stored=True)
    outs.finish(result.path)  # the staged copy of an uploaded video: never left behind
    if taken is not None and taken != result.path:  # copied into a local output folder
        with contextlib.suppress(OSError):
            taken.unlink()
    if resumed:
        log.warning(
            "job %s: its output is stored again; batch %s resumed",
            job_id,
            claim.batch_id,
            extra={"event": "download.outputs_resumed", "job_id": job_id, "batch_id": claim.batch_id},
        )
        rt.notify("freed", job_id)  # sending may go on: dispatch again now
    return "succeeded"


def _still_held(held: HeldLease) -> Callable[[int], None]:
    """``publish``'s progress: aborts the upload (:class:`StateConflict`) once the keeper found
    the lease taken over; writes nothing (the keeper renews it)."""

    def check(_bytes_so_far: int) -> None:
        if held.lost:
            raise StateConflict(f"job {held.fence.job_id}: the lease was lost while its output was stored")

    return check


def _holds_lease(rt: Runtime, held: HeldLease) -> bool:
    """Whether this try still holds the job's lease, asked of the database (fenced by the
    version and owner it took it with, and renewing it): before a failed upload removes the
    video it stored. Not when the database cannot say: then nothing is removed (the next try
    sends the video again, or finds it stored)."""
    if held.lost:
        return False
    try:
        with db.session_scope(rt.engine) as session:
            return store.extend_lease(
                session, held.fence, now=utcnow(), lease_seconds=rt.settings.lease_seconds
            )
    except Exception as exc:
        log.warning(
            "job %s: could not check its lease before removing its stored video (%s): left as it is",
            held.fence.job_id,
            summary(exc),
            extra={"event": "download.lease_check_failed", "job_id": held.fence.job_id},
        )
        return False


def _stored_late(
    rt: Runtime, job_id: str, claim: DownloadClaim, outs: OutputStore, took: float, *, stored: bool
) -> str:
    """The job's lease was taken over while its output was being stored (``stored``: after it
    was): say so — this was silent, and a storage slower than the lease had every try taken over
    and the output uploaded again, for ever. The next holder finds what was stored and does
    not send it again (``publish``'s ``stored_before``)."""
    log.warning(
        "job %s: its lease was taken over while its output was %s at %s (storing took %.1fs; "
        "WANBATCH_LEASE_SECONDS=%g): the job's next try finishes it%s; if the storage is that slow, "
        "raise WANBATCH_LEASE_SECONDS",
        job_id,
        "stored" if stored else "being stored",
        outs.describe(),
        took,
        rt.settings.lease_seconds,
        ", not uploading again what is stored" if outs.is_remote else "",
        extra={"event": "download.lease_lost_storing", "job_id": job_id, "batch_id": claim.batch_id},
    )
    return "lost-lease"


#: How often a try that lost its lease after storing its video asks whether the job's new holder
#: has recorded the job's output (:func:`_withdraw_if_stored_elsewhere`), in seconds.
RECORDED_ELSEWHERE_POLL = 0.5


def _withdraw_if_stored_elsewhere(
    rt: Runtime, job_id: str, video: Path, sidecar: dict[str, Any], sha256: str
) -> None:
    """This try published ``video`` (and its sidecar) after its lease was taken over (a process
    frozen past it: ``kill -STOP``, a paused VM). The new holder may have found this video under
    the job's name without its sidecar, held while it was stored, and stored its own copy beside
    it (:func:`_occupied`): once it records the job's success under that other name, this pair
    is a second copy no job points to — withdrawn, or every listing, export and ``verify`` of
    the folder would meet a stray video.

    Only this try withdraws it, and only on its own database's word: the new holder cannot tell
    this pair from the same video that another copy of the database (a backup run beside it, a
    shared output folder) stores and records under that name at the same moment. While the job
    is not recorded yet (the new holder still fetching its copy), this try waits for it, at most
    a lease (``WANBATCH_LEASE_SECONDS``) and not past a stop of the run or a worker's warm
    shutdown (:attr:`~worker.steps.output_writes.OutputWrites.ending`); the pair stays when the
    new holder takes this very video (its recorded output) or nothing is recorded by then."""
    request_id = sidecar.get("request_id")
    if not isinstance(request_id, str):
        return
    give_up = time.monotonic() + rt.settings.lease_seconds
    while True:
        try:
            with db.session_scope(rt.engine) as session:
                job = store.job_snapshot(session, job_id)
        except Exception:  # the database cannot say: the pair stays (as it always did)
            return
        if job.state == JobState.SUCCEEDED:
            break
        if job.state in TERMINAL_STATES or time.monotonic() >= give_up:
            return
        if rt.output_writes.ended(RECORDED_ELSEWHERE_POLL):  # a run's stop, a warm shutdown (a child's too)
            return
    if job.output_path is None or job.output_sha256 != sha256 or _may_be(job.output_path, video):
        return  # the new holder took this very video (it is the job's output), or another one
    _withdraw_copy(video, job_id=job_id, request_id=request_id, sha256=sha256)


def _may_be(recorded: str, video: Path) -> bool:
    """Whether the job's recorded output may be ``video`` itself: the same path, the same file
    by another path (the new holder's host reaches the output folder elsewhere: a container's
    bind mount, a share mounted at another place), or a path this process cannot look at, where
    it cannot tell. Compared as strings only, the recorded output reached by another path was
    removed as a second copy of itself."""
    if Path(recorded) == video:
        return True
    try:
        return Path(recorded).samefile(video)
    except OSError:
        return True


def _withdraw_copy(video: Path, *, job_id: str, request_id: str, sha256: str) -> bool:
    """Remove ``video`` and its sidecar when the sidecar says it is a copy of the job's recorded
    output — the same job, request and bytes — stored under the job's name by a try that lost
    its lease. Nothing else is touched (another request's video, one without its sidecar). One
    that is gone already (removed by hand meanwhile) is nothing to say."""
    record = outputs.read_sidecar(video)
    if (
        record is None
        or record.get("job_id") != job_id
        or record.get("request_id") != request_id
        or record.get("video_sha256") != sha256
    ):
        return False
    try:
        video.unlink()
        outputs.sidecar_path(video).unlink(missing_ok=True)
    except FileNotFoundError:  # the other try withdrew it meanwhile: nothing is left
        return False
    except OSError as exc:
        log.warning(
            "job %s: could not remove %s, a second copy of its output left by a try that lost its lease: %s",
            job_id,
            video.name,
            exc.strerror or exc,
            extra={"event": "download.copy_left", "job_id": job_id},
        )
        return False
    log.info(
        "job %s: removed %s, a second copy of its output stored by a try that lost its lease",
        job_id,
        video.name,
        extra={"event": "download.copy_withdrawn", "job_id": job_id},
    )
    return True


def nothing_more(job: JobView) -> dict[str, Any]:
    """The cost of a job that stores a video another job paid for: what fal billed its own
    earlier attempts (a rerun's job sent before it took the staged video: fal ran, and billed,
    a request of its own), 0 when nothing was — taking the video adds nothing to it."""
    return {
        "actual_usd": job.actual_usd if job.actual_usd is not None else Decimal(0),
        "actual_billing_units": (
            job.actual_billing_units if job.actual_billing_units is not None else Decimal(0)
        ),
    }


#: The ``error_type`` of a rerun's job whose staged video was no longer the one its original
#: downloaded when it came to store it (gone, or other bytes): nothing was sent, nothing paid.
STAGED_CHANGED = "staged_output_changed"


def _take_staged(rt: Runtime, job_id: str, claim: DownloadClaim, held: HeldLease) -> str:
    """Store the paid video the job this rerun's job repeats left in the staging folder
    (dispatch moved it here: :func:`worker.steps.dispatch._take_staged`), as a download would:
    checked again against the SHA-256 and size its original recorded, probed, uploaded (or
    placed in the output folder) with a sidecar describing the request fal made it for, then
    the job succeeds, costing nothing more (:func:`nothing_more`). An upload that fails is
    retried, and pauses the batch, like any other (:func:`_upload_failed`): the file stays where
    it is until the success.

    A file gone or changed since dispatch checked it ends the job ``failed``
    (:data:`STAGED_CHANGED`, nothing more billed: :func:`nothing_more`): nothing was sent, and
    no other file is ever taken."""
    settings = rt.settings
    original_id = claim.job.rerun_of
    maker_id = claim.job.reused_from
    assert original_id is not None
    assert maker_id is not None
    outs = open_output_store(settings)
    try:
        with db.read_scope(rt.engine) as session:
            original = store.get_job(session, original_id)
            maker = store.get_job(session, maker_id)
            path, why = find_staged(session, settings, original)
        dest = outs.video_dest(claim.batch_name, claim.item_index, job_id)
    except OutputWriteError as exc:  # the staging or output folder cannot be placed: the file waits
        return _write_failed(rt, job_id, claim, exc)
    if path is None:
        with db.session_scope(rt.engine) as session:
            stored = store.fail_job(
                session,
                claim.fence,
                error=f"the paid video job {original_id} left in the staging folder is not taken: {why}; "
                "nothing was sent (`rerun --failed-only` renders it again, at its price)",
                error_type=STAGED_CHANGED,
                **nothing_more(claim.job),
            )
        return "failed" if stored else "lost-lease"
    sha256, size = original.output_sha256, original.output_bytes
    assert sha256 is not None  # find_staged matched them
    assert size is not None
    result = DownloadResult(path=path, sha256=sha256, size=size)
    if not outs.is_remote:  # the output folder: a copy there is the output (the staged file stays)
        try:
            _copy_whole(path, dest)
        except OSError as exc:
            failed = OutputWriteError(f"could not write {dest}: {exc.strerror or exc}")
            failed.__cause__ = exc
            return _write_failed(rt, job_id, claim, failed)
        result = DownloadResult(path=dest, sha256=sha256, size=size)
    remote = outs.is_remote
    return _store_video(
        rt, job_id, claim, outs, dest, result, held=held, maker=maker, taken=path, stored_before=remote
    )


def _copy_whole(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest`` through a temporary file renamed into place (never a partial
    ``dest``); the output store makes the folder durable with the sidecar."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    temp = dest.with_name(f".{dest.name}.taken")
    try:
        shutil.copyfile(source, temp)
        with temp.open("rb+") as fh:
            os.fsync(fh.fileno())
        temp.replace(dest)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()


def taken_sidecar(
    maker: JobView, job: JobView, batch_name: str, video_path: str, sha256: str, size: int
) -> dict[str, Any]:
    """The sidecar of a rerun's job that took the paid video ``maker``'s request made: what
    reproduces it is ``maker``'s (its submitted input, the seed fal returned, request id, fal's
    result and metrics, times); where it is filed and what it cost (:func:`nothing_more`: only
    what its own earlier attempts were billed, if any) are the job's own, and ``reused_from``
    names ``maker``."""
    record = sidecar_record(maker, batch_name, video_path, sha256, size, nothing_more(job))
    record.update(
        job_id=job.id,
        batch=job.batch_id,
        item_index=job.item_index,
        est_usd=str(job.est_usd),
        attempts=job.attempts,
        reused_from=maker.id,
    )
    return record


def _download_video(
    rt: Runtime,
    job_id: str,
    claim: DownloadClaim,
    video: Video,
    dest: Path,
    occupied: Callable[[Path], Path] | None = None,
    *,
    placing: Callable[[int], None] | None = None,
) -> DownloadResult | str:
    """Fetch the video into ``dest`` (atomically; ``occupied``: never over a file there;
    ``placing``: called with the finished file's descriptor before it takes the name; see
    :func:`worker.fal.storage.download`); an outcome string when that did not work."""
    settings = rt.settings
    shared = download_client(rt)
    client = shared.get()
    try:
        result = download_file(
            video.url,
            dest,
            expected_size=video.file_size,
            max_bytes=settings.download_max_bytes,
            client=client,
            policy=shared.policy,
            timeout=shared.timeout,
            total_timeout=settings.download_timeout,
            progress=_LeaseKeeper(rt, claim.fence),
            on_response=_mid_download,
            expect_video=True,
            temp_tag=outputs.partial_tag(claim.version),
            # The output store makes the folder durable once the sidecar is beside the video
            # (write_json_atomic: one folder sync for both renames), before the success commits;
            # a staged video for object storage needs none (it is uploaded before that commit).
            sync_dir=False,
            occupied=occupied,
            placing=placing,
        )
    except StateConflict:
        return "lost-lease"
    except OutputWriteError as exc:
        return _write_failed(rt, job_id, claim, exc)
    except DownloadUnreachedError as exc:
        return _download_unreached(rt, job_id, claim, exc)
    except DownloadRefusedError as exc:
        return _download_refused(rt, job_id, claim, exc)
    except ProviderError as exc:
        if exc.status_code is not None or isinstance(exc, RetryableProviderError):
            _media_host_answered(rt)  # it answered, or the connection was made: not a refusal here
        if host_trouble(exc):
            return _download_troubled(rt, job_id, claim, exc, _host_of(video.url))
        rt.download_trouble.forget(job_id)
        return _download_failed(rt, job_id, claim, exc)
    _media_host_answered(rt)
    _media_host_served(rt, job_id)
    return result


def _downloaded_before(
    job_id: str,
    dest: Path,
    video: Video,
    sent_at: datetime | None,
    earlier_items: Sequence[int] | None,
    *,
    staged: bool,
    request_id: str | None = None,
) -> DownloadResult | None:
    """The video an earlier try of this job already put at ``dest``, hashed again — so it is
    not downloaded a second time: fal's file may have expired meanwhile, and the video is paid
    for. None when there is none that is surely this request's (then it is downloaded).

    * ``staged`` (object storage): the video an earlier try downloaded and staged but could not
      upload. A staged file of another size than fal described is removed.
    * A local output folder: the video an earlier try renamed into place before it could record
      the job's success (the process died in between: ``kill -9``, a power loss after the file
      and its folder were synced). A file of another size is left alone (the download stores its
      video beside it: :func:`_occupied`). Nor is one that another process holds while it
      stores it (:func:`_being_stored`: a copy of this database), nor one whose sidecar names
      another request than ``request_id`` (that copy's, stored). The hold is asked first: a
      process holds its video from before it takes the name until its sidecar is beside it
      (:class:`_StoringHold`), so a file neither held nor with a sidecar is a dead try's.

    Why such a file is this request's: its name holds only our ids (:func:`outputs.video_path`),
    and only a download of this job puts a file there, renamed into place whole (``download``
    writes a temporary file first), so it is never a partial one. A job only ever downloads the
    video of the request it holds, and a video that does not count is removed with its job's
    failure (:func:`_check_media`). No other job writes under its name: a rerun's jobs have ids,
    so names, of their own (one taking a staged video, ``reused_from``, never comes here), and
    a job reusing an output (``reuse_outputs``) records the original's path and has no file.
    One case is left: a try dies after the rename, the next one hears from fal that the request
    failed, and the job is sent again as a new request — the file is then the earlier
    request's. So a file is taken only when it was written (its mtime, which a rename keeps) at
    or after the moment the job's current request was sent (``sent_at``: its ``submitted_at``):
    a video of that request cannot be older, and one of an earlier request is. Without that
    time nothing is taken from a local folder (a staged file is, as it always was).

    One left under an item number the job had before a resubmit of an edited manifest
    renumbered it (``earlier_items``: :func:`_under_an_earlier_number`) is moved to ``dest``
    first, a sidecar beside it removed (the success writes one under the new number) — when
    ``dest`` holds no video of the current request: none at all, or one written before it was
    sent (a job renumbered back to a number under which an earlier request's video stands). The
    probe that follows (:func:`_check_media`) checks it as it checks any download.
    """
    if sent_at is None and not staged:
        return None
    try:
        current = _current(dest, sent_at)
        if not current:
            earlier = _under_an_earlier_number(dest, job_id, earlier_items, sent_at)
            if earlier is None:
                return None  # nothing of this request at dest (the usual case: one lstat, no more)
            earlier.replace(dest)  # over a stale file of its own, if any: an earlier request's video
            if not staged:
                outputs.sidecar_path(earlier).unlink(missing_ok=True)
            if not _written_since(dest, sent_at):
                return None
        if not staged and not _an_earlier_trys(dest, request_id):
            return None  # another process's (a copy of this database): stored there, or being stored
        size = dest.stat().st_size
        if video.file_size is not None and size != video.file_size:
            if staged:
                dest.unlink()
            return None
        digest = hashlib.sha256()
        with dest.open("rb") as fh:
            while chunk := fh.read(1024 * 1024):
                digest.update(chunk)
    except OSError:
        return None
    if staged:
        log.info(
            "job %s: uploading the video staged by an earlier try (no new download)",
            job_id,
            extra={"event": "download.upload_staged"},
        )
    else:
        log.info(
            "job %s: taking the video an earlier try already saved as %s (no new download)",
            job_id,
            dest.name,
            extra={"event": "download.already_saved"},
        )
    return DownloadResult(path=dest, sha256=digest.hexdigest(), size=size)


def _an_earlier_trys(video: Path, request_id: str | None) -> bool:
    """Whether the video at ``video`` in a local output folder may be this request's, left by
    an earlier try: not while another process holds it (storing it now), nor when its sidecar
    names another request. Held first, then the sidecar: a holder writes its sidecar before it
    lets go, so one found unheld has its sidecar by then, if it will ever have one."""
    if _being_stored(video):
        return False
    record = outputs.read_sidecar(video)
    return record is None or request_id is None or record.get("request_id") == request_id


def _under_an_earlier_number(
    dest: Path, job_id: str, earlier_items: Sequence[int] | None, sent_at: datetime | None
) -> Path | None:
    """The job's file of ``dest``'s kind saved under an item number it had before (a resubmit of
    an edited manifest renumbered it since: ``jobs.earlier_items``), written since ``sent_at``
    (:func:`_written_since`), else None; the most recent number first.

    Each earlier number is one ``stat`` of the name it gives (:func:`outputs.under_earlier_items`,
    never more than ``jobs.models.EARLIER_ITEMS_KEPT``), and a job never renumbered makes none:
    before, every download listed the whole folder (every video of the batch so far), which made
    a batch quadratic in its size. Only a job whose earlier numbers nobody recorded
    (``EARLIER_ITEMS_UNKNOWN``: sent before schema 0032) still lists it
    (:func:`outputs.under_another_item`)."""
    for path in outputs.under_earlier_items(dest, job_id, earlier_items):
        try:
            if _written_since(path, sent_at):
                return path
        except OSError:
            continue  # none under that number
    return None


def _current(dest: Path, sent_at: datetime | None) -> bool:
    """Whether ``dest`` holds a file written since ``sent_at`` (:func:`_written_since`): not
    when there is none."""
    try:
        return _written_since(dest, sent_at)
    except FileNotFoundError:
        return False


def _written_since(path: Path, sent_at: datetime | None) -> bool:
    """Whether ``path`` is a regular file (not a link, nothing else) last written at or after
    ``sent_at`` (no time: any). :class:`OSError` when it cannot be looked at (gone)."""
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        return False
    return sent_at is None or info.st_mtime >= sent_at.timestamp()


def _check_media(
    rt: Runtime, job_id: str, claim: DownloadClaim, job: JobView, path: Path, *, walked: bool = False
) -> dict[str, Any] | str:
    """Probe the saved video and compare it with the request (:mod:`worker.probe`).

    Returns the ``media``/``media_mismatch`` fields to store with the success, or — when the
    file is not a decodable video, or it does not match and ``WANBATCH_MEDIA_MISMATCH=fail`` —
    fails the job with the reason and its billed cost (fal made it) and returns ``"failed"``.
    The file of a failed job is removed: no output is kept that does not count — but for a
    staged video a rerun's job took (``reused_from``), which it never deletes: it was paid for.
    A file gone before it is probed (its folder removed mid-run) is no verdict on the video:
    the batch is paused as for any output that cannot be kept (:func:`_write_failed`) — looked
    at once the probe failed, not before every probe. ``walked``: a fresh download's boxes
    were walked as it was written (``DownloadResult.whole``).
    """
    keep = job.reused_from is not None
    try:
        info = probe.probe(path, walked=walked)
    except probe.LocalProbeError as exc:
        # Out of file descriptors or memory here, or a disk that failed the read: our trouble,
        # not fal's. The file stays (the next try takes it: _downloaded_before) and the job
        # waits as for a disk that cannot keep outputs — never not_a_video, which deleted the
        # paid video and failed it for good.
        return _probe_short(rt, job_id, claim, path, exc)
    except probe.NotAVideoError as exc:
        if not path.exists():  # removed under us (its folder deleted mid-run): the disk's doing, not fal's
            gone = OutputWriteError(f"the saved video {path} was removed before it could be stored")
            return _write_failed(rt, job_id, claim, gone)
        if not keep:
            with contextlib.suppress(OSError):
                path.unlink()
        with db.session_scope(rt.engine) as session:
            error = f"output is not a video: {exc}"
            return _fail_paid(session, claim, error=error, error_type="not_a_video", **claim.fetched)
    try:
        expectation = probe.expected_media(job.endpoint, job.submitted_input or job.input or {})
    except WanbatchError:  # an endpoint no longer in the registry: nothing to compare with
        mismatch = None
    else:
        mismatch = probe.compare(info, expectation)
    checked: dict[str, Any] = {"media": info.as_json(), "media_mismatch": mismatch}
    if mismatch is None:
        return checked
    if rt.settings.media_mismatch != "fail":
        log.warning(
            "job %s: the video does not match the request: %s",
            job_id,
            mismatch,
            extra={"event": "download.media_mismatch"},
        )
        return checked
    if not keep:
        with contextlib.suppress(OSError):
            path.unlink()
    with db.session_scope(rt.engine) as session:
        return _fail_paid(
            session,
            claim,
            error=f"the video does not match the request: {mismatch}",
            error_type="media_mismatch",
            **claim.fetched,
            **checked,
        )


def _download_failed(rt: Runtime, job_id: str, claim: DownloadClaim, exc: ProviderError) -> str:
    """The video could not be fetched: try again later, or fail (final error or out of tries)."""
    telemetry.count_provider_error(exc)
    failures = claim.failures + 1
    with db.session_scope(rt.engine) as session:
        # A final error (the file expired, the host is refused, not a video) cannot heal: fail now.
        # This try's failure, for the step's line: a retry stores no error of its own.
        logs.note_error(f"download failed {failures} time(s): {exc}", "download_failed")
        if isinstance(exc, FinalProviderError) or failures >= rt.settings.download_attempts:
            error = f"download failed {failures} time(s): {exc}"
            return _fail_paid(
                session,
                claim,
                error=error,
                error_type="download_failed",
                download_attempts=failures,
                **claim.fetched,
            )
        store.release_lease(
            session,
            claim.fence,
            next_attempt_at=in_seconds(backoff(rt.settings, failures)),
            download_attempts=failures,
            **claim.fetched,
        )
    return "download-retry"


#: The statuses of a media host's answer that say it is in trouble, not that the file is bad or
#: gone: a request timeout, too many requests, any server error (RFC 9110 §15.6). 403/404/410 are
#: final (the file expired: :func:`worker.fal.storage._download_error`); other 4xx are counted.
HOST_TROUBLE_STATUSES = frozenset({408, 429})


def host_trouble(exc: ProviderError) -> bool:
    """Whether a failed download is the media host's passing trouble (:class:`DownloadTrouble`
    of :mod:`worker.steps.download_reach`): an error answer in :data:`HOST_TROUBLE_STATUSES` or
    ``5xx``, or the connection lost while the body came (a reset, a read timeout: a transport
    error once connected). Not a whole answer that is wrong (a body shorter or longer than fal's
    ``file_size``, an MP4 cut short, not a video: :class:`DownloadIntegrityError` or final), nor
    a download that took longer than ``WANBATCH_DOWNLOAD_TIMEOUT`` altogether (a host that drips
    its bytes): those stay counted tries, bounded by ``WANBATCH_DOWNLOAD_ATTEMPTS``; nor one that
    could not connect (:class:`DownloadUnreachedError`, held on its own path)."""
    if not isinstance(exc, RetryableProviderError) or isinstance(
        exc, DownloadIntegrityError | DownloadUnreachedError
    ):
        return False
    code = exc.status_code
    if code is not None:
        return code >= 500 or code in HOST_TROUBLE_STATUSES
    return isinstance(exc.__cause__, httpx.TransportError)


def _host_of(url: str) -> str:
    """The host (and port, when not the scheme's) a video URL names, for the words of a pause."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "the media host"
    host = parsed.host or "the media host"
    shown = f"[{host}]" if ":" in host else host
    return shown + (f":{parsed.port}" if parsed.port not in (None, 80, 443) else "")


def _trouble_words(exc: ProviderError) -> str:
    """How the media host failed, after its name: ``answers HTTP 503`` or ``drops the download
    midway (ReadError)``."""
    if exc.status_code is not None:
        return f"answers HTTP {exc.status_code}"
    return f"drops the download midway ({type(exc.__cause__).__name__})"


def _download_troubled(rt: Runtime, job_id: str, claim: DownloadClaim, exc: ProviderError, host: str) -> str:
    """fal's media host failed the download in a way it may get over (:func:`host_trouble`):
    the video was made and paid for, and fal keeps it (an expired file answers 403/404/410).

    Not a try: the job waits in ``downloading``, its ``download_attempts`` unchanged, tried
    again after a backoff of its own that grows to ``WANBATCH_RETRY_MAX_DELAY`` (or the host's
    ``Retry-After``, capped there). Once the host has failed downloads for
    :data:`~worker.steps.download_reach.PAUSE_AFTER_SECONDS` with none stored whole, the job's
    batch (when active) is paused naming the host and what it answers: nothing more is sent to
    be paid for and meet the same outage; the pause ends by itself with the first output of the
    batch stored again (:func:`jobs.store.resume_after_outputs_stored`), or with the next run.
    A paused batch's job just waits. Only while the host serves nothing: once another video was
    stored whole since this job's previous failure, the failure is about this job's file and
    counts as a try (:attr:`~worker.steps.download_reach.Troubled.serves_others`). A cancelled
    batch's is held :data:`~worker.steps.download_reach.CANCELLED_PATIENCE_SECONDS` at most
    (:func:`_cancelled_given_up`).

    The horizon: the job fails (``download_failed``, its billed cost) only once fal completed
    its request more than :data:`~worker.steps.download_reach.MEDIA_HORIZON_DAYS` days ago — the
    media lifetime fal gives by default — and the host has failed it ``WANBATCH_DOWNLOAD_ATTEMPTS``
    times in a row since this process began trying: not on a single 503 after a week's pause."""
    what = _trouble_words(exc)
    trouble = rt.download_trouble.failed(job_id, host, what, _stale_after(rt))
    if trouble.serves_others:
        # The host stored other videos since this job's last failure: not an outage, this
        # file's trouble. Counted (the job fails after WANBATCH_DOWNLOAD_ATTEMPTS), or one
        # file a host fails for good held its job, and the run waiting on it, for days.
        return _download_failed(rt, job_id, claim, exc)
    telemetry.count_provider_error(exc)
    if trouble.held_for >= CANCELLED_PATIENCE_SECONDS and _batch_cancelled(rt, claim.batch_id):
        return _cancelled_given_up(rt, claim, trouble.held_for, f"{host} {what}: {exc}")
    horizon = timedelta(days=MEDIA_HORIZON_DAYS)
    past = claim.completed_at is not None and utcnow() >= claim.completed_at + horizon
    if past and trouble.tries >= rt.settings.download_attempts:
        with db.session_scope(rt.engine) as session:
            error = (
                f"download failed {trouble.tries} time(s) in a row, more than {MEDIA_HORIZON_DAYS} days "
                f"after fal made the video (its default media lifetime): {host} {what}: {exc}"
            )
            logs.note_error(error, "download_failed")
            return _fail_paid(
                session,
                claim,
                error=error,
                error_type="download_failed",
                download_attempts=claim.failures,
                **claim.fetched,
            )
    logs.note_error(f"download held, not counted: {host} {what}: {exc}", "download_unavailable")
    delay = max(backoff(rt.settings, min(trouble.tries, 64)), retry_after(rt.settings, exc))
    lasted = f" for {trouble.lasted:.0f}s" if trouble.lasted >= 1 else ""
    reason = (
        f"{store.OUTPUTS_PAUSE_PREFIX}{CANNOT_DOWNLOAD}: {host} {what} to every download{lasted} ({exc}); "
        "the videos already made wait at fal and are downloaded once it serves them again (the batch "
        "then resumes by itself) or by the next run, never made again"
    )
    ended = _hold(
        rt,
        job_id,
        claim,
        reason,
        pause=trouble.pause,
        delay=delay,
        why="fal's media host keeps failing downloads",
        event="download.host_trouble_paused",
        download_attempts=claim.failures,
    )
    if ended is not None:
        return ended
    log.log(
        logging.WARNING if trouble.say else logging.INFO,
        "downloads wait%s: %s %s (%s); the paid videos wait at fal (none fails, no try counted), "
        "job %s tried again in %.0fs",
        lasted,
        host,
        what,
        exc,
        job_id,
        delay,
        extra={"event": "download.host_trouble", "job_id": job_id, "batch_id": claim.batch_id},
    )
    return "download-held"


#: How a pause for downloads that cannot connect, or that the media host fails, begins (after
#: :data:`store.OUTPUTS_PAUSE_PREFIX`): ``wanbatch cancel`` tells it apart from a pause for a disk.
CANNOT_DOWNLOAD = store.CANNOT_DOWNLOAD


def _batch_cancelled(rt: Runtime, batch_id: str) -> bool:
    """Whether ``batch_id`` was cancelled: a download it holds then waits
    :data:`~worker.steps.download_reach.CANCELLED_PATIENCE_SECONDS` at most (:func:`_cancelled_given_up`)."""
    with db.read_scope(rt.engine) as session:
        return store.get_batch(session, batch_id).state == BatchState.CANCELLED


def _stale_after(rt: Runtime) -> float:
    """After how long without a failure a held job has left unseen: it would have been tried
    again by then (its backoff is at most ``WANBATCH_RETRY_MAX_DELAY``, a lease it left behind
    lapses within ``WANBATCH_LEASE_SECONDS``)."""
    return rt.settings.retry_max_delay + rt.settings.lease_seconds


def _cancelled_given_up(rt: Runtime, claim: DownloadClaim, held_for: float, what: str) -> str:
    """A cancelled batch's download held for :data:`~worker.steps.download_reach.CANCELLED_PATIENCE_SECONDS`
    since its first failure still waiting: it fails (``download_failed``, its cost recorded).

    A held download is waited for so that the batch's next run stores it; a cancelled batch has
    none, and ``wanbatch cancel`` processes the batch until it is over — it waited for days
    (fal's media lifetime) while a CDN outage or a network with no way to the CDN lasted. Nor by
    its tries (``WANBATCH_DOWNLOAD_ATTEMPTS``): those took about 75 s, and a blip that long threw
    away every paid video of the batch (``rerun --failed-only`` then paid for them again)."""
    error = (
        f"download held {held_for:.0f}s after its batch was cancelled (at most "
        f"{CANCELLED_PATIENCE_SECONDS:.0f}s), not downloaded: {what}"
    )
    with db.session_scope(rt.engine) as session:
        logs.note_error(error, "download_failed")
        return _fail_paid(
            session,
            claim,
            error=error,
            error_type="download_failed",
            download_attempts=claim.failures,
            **claim.fetched,
        )


def _download_unreached(rt: Runtime, job_id: str, claim: DownloadClaim, exc: DownloadUnreachedError) -> str:
    """The video's host could not even be connected to (:mod:`worker.steps.download_reach`): no
    answer, so nothing is known about the file, and the video is paid for. Not a try: the job
    waits in ``downloading``, its attempts unchanged, tried again after the hold's pause; one
    warning line names the host and the fix. Once the outage has lasted
    :data:`~worker.steps.download_reach.PAUSE_AFTER_SECONDS`, the job's batch (when active) is
    paused with that reason, which ends by itself once an output is stored again: nothing more
    is sent to be paid for and meet the same wall. A paused batch's job just waits: never failed
    for it. A cancelled batch's is held :data:`~worker.steps.download_reach.CANCELLED_PATIENCE_SECONDS`
    at most (:func:`_cancelled_given_up`)."""
    fix = unreached_fix(rt.settings, exc.host, exc.proxy)
    held = rt.download_reach.failed(exc.host, f"{exc} — {fix}", job_id, _stale_after(rt))
    telemetry.count_provider_error(exc)
    if held.held_for >= CANCELLED_PATIENCE_SECONDS and _batch_cancelled(rt, claim.batch_id):
        return _cancelled_given_up(rt, claim, held.held_for, f"{exc} — {fix}")
    logs.note_error(f"download held, not counted: {exc}", "download_unreachable")
    reason = (
        f"{store.OUTPUTS_PAUSE_PREFIX}{CANNOT_DOWNLOAD}: {exc} — {fix}; the videos already made wait at fal "
        "and are downloaded once it connects (the batch then resumes by itself) or by the next run, "
        "never made again"
    )
    ended = _hold(
        rt,
        job_id,
        claim,
        reason,
        pause=held.pause,
        delay=held.delay,
        why="downloads cannot connect",
        event="download.unreachable_paused",
        renew=rt.download_reach.may_renew,
    )
    if ended is not None:
        return ended
    if held.say:
        lasted = f" for {held.lasted:.0f}s" if held.lasted >= 1 else ""
        log.warning(
            "downloads cannot connect%s: %s — %s; the paid videos wait at fal (none fails, no try "
            "counted), tried again every %gs",
            lasted,
            exc,
            fix,
            held.delay,
            extra={"event": "download.unreachable", "job_id": job_id, "batch_id": claim.batch_id},
        )
    return "download-held"


def _download_refused(rt: Runtime, job_id: str, claim: DownloadClaim, exc: DownloadRefusedError) -> str:
    """The download policy refused the video's host (or a redirect's): not in
    ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS``, or at a loopback, private, link-local… address
    (:class:`~worker.fal.storage.DownloadPolicy`). Nothing was connected to, and the video was
    made and paid for.

    It failed the job at once (``download_failed``, "cannot heal"), yet a setting decides it: the
    user lists the host, and a run after that downloads the video — but the job was terminal,
    and only ``rerun --failed-only`` got the video again, paying for it again. So it is held, as
    a download that cannot connect is (:func:`_download_unreached`): not a try, the job waits in
    ``downloading`` with its result kept, and its batch (when active) is paused at once with the
    reason — the host, the address it resolved to, the setting to give — since no wait in this
    process changes its settings, and every job sent meanwhile would be paid for and meet the
    same refusal. ``run`` stops there (exit 2) and says it; the next ``run`` resumes the batch
    and tries the download again under the settings it then has. Said in one warning line per
    batch and host in this process; tried again every ``WANBATCH_RETRY_MAX_DELAY`` (a worker
    restarted with the setting changed takes it then, and the pause ends with the first video
    stored: :func:`jobs.store.resume_after_outputs_stored`). The guard itself is unchanged:
    nothing is fetched from the host until the user lists it.

    Bounds, as for a held download the host fails (:func:`_download_troubled`): a cancelled
    batch's job fails at once (no setting changes while ``wanbatch cancel`` ends the batch), and
    so does a job whose video fal made more than
    :data:`~worker.steps.download_reach.MEDIA_HORIZON_DAYS` days ago (fal's default media
    lifetime: it may be gone), each with the billed cost and the refusal's words."""
    rt.download_trouble.forget(job_id)
    telemetry.count_provider_error(exc)
    failed_as: str | None = None
    made = claim.completed_at
    if _batch_cancelled(rt, claim.batch_id):
        failed_as = f"download refused, its batch cancelled: {exc}"
    elif made is not None and utcnow() - made >= timedelta(days=MEDIA_HORIZON_DAYS):
        failed_as = (
            f"download refused more than {MEDIA_HORIZON_DAYS} days after fal made the video (its default "
            f"media lifetime, after which fal may no longer keep it): {exc}"
        )
    if failed_as is not None:
        with db.session_scope(rt.engine) as session:
            logs.note_error(failed_as, "download_failed")
            return _fail_paid(
                session,
                claim,
                error=failed_as,
                error_type="download_failed",
                download_attempts=claim.failures,
                **claim.fetched,
            )
    logs.note_error(f"download held, not counted: {exc}", "download_refused")
    waits = (
        f"the videos already made wait at fal (it keeps them {MEDIA_HORIZON_DAYS} days by default) and are "
        "downloaded by the next run once the setting allows the host, never made again"
    )
    ended = _hold(
        rt,
        job_id,
        claim,
        f"{store.OUTPUTS_PAUSE_PREFIX}{CANNOT_DOWNLOAD}: {exc}; {waits}",
        pause=True,
        delay=rt.settings.retry_max_delay,
        why="its download was refused",
        event="download.refused_paused",
        download_attempts=claim.failures,
    )
    first = _first_refusal(rt, claim.batch_id, exc.host)  # marked said by the pause's warning too
    if ended is not None:
        return ended
    if first:
        log.warning(
            "download refused: %s; the paid video waits at fal (no try counted), tried again in %.0fs",
            exc,
            rt.settings.retry_max_delay,
            extra={"event": "download.refused", "job_id": job_id, "batch_id": claim.batch_id},
        )
    return "download-held"


#: Guards :attr:`Runtime.download_refusals_said` (:func:`_first_refusal`).
_REFUSALS_SAID = threading.Lock()


def _first_refusal(rt: Runtime, batch_id: str, host: str) -> bool:
    """Whether this refusal of ``host`` is the first of batch ``batch_id`` in this process,
    marking it said: every other video of the batch meets the same refusal, and one line (the
    pause's warning, or the hold's when the batch was paused already) says it."""
    with _REFUSALS_SAID:
        if (batch_id, host) in rt.download_refusals_said:
            return False
        if len(rt.download_refusals_said) >= 4096:
            rt.download_refusals_said.clear()  # bounded: said again, no more
        rt.download_refusals_said.add((batch_id, host))
        return True


def _hold(
    rt: Runtime,
    job_id: str,
    claim: DownloadClaim,
    reason: str,
    *,
    pause: bool,
    delay: float,
    why: str,
    event: str,
    renew: Callable[[str], bool] | None = None,
    **fields: Any,
) -> str | None:
    """Keep a paid download waiting, uncounted (:func:`_download_troubled`,
    :func:`_download_unreached`): its lease given back with the next try ``delay`` seconds
    away (and ``fields``), and, when the outage has lasted long enough (``pause``), its batch
    paused with ``reason`` if still active. ``"lost-lease"`` or ``"outputs-paused"`` (said in
    a warning: ``why``, ``event``) when the step ends so; None when the job simply waits.

    ``renew``: a batch paused for downloads already takes ``reason`` when it differs (the
    cannot-connect reason, whose words change only with what failed: another host, a proxy
    refusing now where the name did not resolve), so ``status`` shows the latest failure's
    reason, not the one the batch was paused with — when ``renew(batch_id)`` allows it
    (:meth:`~worker.steps.download_reach.DownloadReach.may_renew`: at most every
    :data:`~worker.steps.download_reach.WARN_EVERY_SECONDS`, not at every failed try)."""
    paused = False
    with db.session_scope(rt.engine) as session:
        if pause:
            batch = store.get_batch(session, claim.batch_id)
            if batch.state == BatchState.ACTIVE:
                store.set_batch_state(session, claim.batch_id, BatchState.PAUSED, reason=reason)
                paused = True
            elif (
                renew is not None
                and store.paused_for_downloads(batch.pause_reason)
                and batch.pause_reason != reason
                and renew(claim.batch_id)
            ):
                store.renew_download_pause(session, claim.batch_id, reason)
        kept = store.release_lease(
            session, claim.fence, next_attempt_at=in_seconds(delay), **fields, **claim.fetched
        )
    if not kept:
        return "lost-lease"
    if paused:
        log.warning(
            "job %s: %s; batch paused: %s",
            job_id,
            why,
            reason,
            extra={"event": event, "job_id": job_id, "batch_id": claim.batch_id},
        )
        return "outputs-paused"
    return None


def _media_host_answered(rt: Runtime) -> None:
    lasted = rt.download_reach.answered()
    if lasted is not None:
        log.warning("downloads connect again after %.0fs", lasted, extra={"event": "download.reachable"})


def _media_host_served(rt: Runtime, job_id: str) -> None:
    """A video was downloaded whole: the media host's trouble, if any, is over."""
    lasted = rt.download_trouble.succeeded(job_id)
    if lasted is not None:
        log.warning(
            "fal's media host serves downloads again after %.0fs",
            lasted,
            extra={"event": "download.host_serves", "job_id": job_id},
        )


def unreached_fix(settings: Settings, host: str, proxy: str | None = None) -> str:
    """What to change when downloads cannot connect to ``host`` (through ``proxy``, credentials
    masked, when they went through one), by how downloads go: through
    ``WANBATCH_DOWNLOAD_PROXY``, or directly while the environment names a proxy they do not
    use, or directly with none."""
    if proxy is not None:
        return (
            f"check that the download proxy {proxy} (WANBATCH_DOWNLOAD_PROXY) is up, accepts "
            f"this machine (its user and password), and reaches {host}"
        )
    env_proxy = environment_proxy() or environment_proxy("http")
    configured = settings.download_proxy is not None
    if env_proxy is not None and not configured:
        return (
            f"downloads go directly, not through the proxy {env_proxy} names: set "
            f"WANBATCH_DOWNLOAD_PROXY=env to download (and upload) through it"
        )
    if configured:
        return (
            f"WANBATCH_DOWNLOAD_PROXY=env, but no proxy variable covers {host} (unset, or NO_PROXY): "
            "set HTTPS_PROXY, or WANBATCH_DOWNLOAD_PROXY to the proxy's URL"
        )
    return (
        f"check this machine's network and DNS for {host}; where only a proxy reaches the internet, "
        "set WANBATCH_DOWNLOAD_PROXY to its URL (or to env, to use HTTPS_PROXY)"
    )


def environment_proxy(scheme: str = "https") -> str | None:
    """The proxy variable of this environment a download of a ``scheme`` URL would go through
    with ``WANBATCH_DOWNLOAD_PROXY=env`` (as httpx picks it: the scheme's own, else
    ``ALL_PROXY``; fal's media are https), named, never its value; None: none is set."""
    found = proxy_variables(os.environ)
    for kind in (scheme, "all"):
        if kind in found:
            return found[kind][0]
    return None


def _upload_failed(
    rt: Runtime, job_id: str, claim: DownloadClaim, exc: OutputUploadError, result: DownloadResult
) -> str:
    """The upload to object storage failed: like a failed download, try again later (the staged
    video is kept and uploaded again, fal is never asked again), up to
    ``WANBATCH_DOWNLOAD_ATTEMPTS`` tries. Meanwhile the job counts in the download backlog, so a
    storage outage holds new submits back (``WANBATCH_MAX_DOWNLOAD_BACKLOG``). When the tries run
    out the storage is down or refuses us for good: the batch is paused, as for a full disk
    (:func:`_write_failed`), and the job waits with its staged copy for the batch's next run.

    Every failed try records the staged video's SHA-256 and size on the job: should its batch be
    cancelled before it is uploaded, a rerun takes exactly that file back (never another one
    under its name) instead of having it rendered again (:mod:`worker.steps.staged`)."""
    staged = result.path
    kept = {"output_sha256": result.sha256, "output_bytes": result.size}
    failures = claim.failures + 1
    attempts = rt.settings.download_attempts
    if failures >= attempts or exc.too_long:
        # A key too long is refused for good: no try heals it, no storage fix either.
        then = (
            f"the videos already made wait in {staged.parent} and are uploaded by the next run "
            "under a shorter WANBATCH_OUTPUT_DIR prefix, never made again"
            if exc.too_long
            else f"fix the storage; the videos already made wait in {staged.parent} and are uploaded "
            "once it takes them (the batch then resumes by itself) or by the next run, never made again"
        )
        # A job whose tries ran out before waits for the storage: its later tries (its batch
        # paused, or gone on and failing again) only ask whether the storage is back, and are not
        # counted — "(after 5 tries)" with WANBATCH_DOWNLOAD_ATTEMPTS=2 read as a broken limit.
        if claim.failures >= attempts:
            tries = f"its {claim.failures} tries had run out before; it failed again once the batch went on"
            counted = claim.failures
        else:
            tries = "after 1 try" if failures == 1 else f"after {failures} tries"
            counted = failures
        return _pause_for_outputs(
            rt,
            job_id,
            claim,
            f"{store.OUTPUTS_PAUSE_PREFIX}be stored: {exc} ({tries}) — {then}",
            # Where the paid video is first: a terminal shows 3 lines of a reason (`status`).
            cancelled=f"{CANCELLED_UNSTORED}: this paid video is kept in {staged.parent} as {staged.name} "
            "and nothing uploads it now (`rerun --failed-only` takes this file back and stores it, "
            "never makes or pays for it again, while it stays as it is); "
            f"the upload failed {failures} times: {exc}",
            download_attempts=counted,
            **kept,
        )
    delay = backoff(rt.settings, failures)
    with db.session_scope(rt.engine) as session:
        store.release_lease(
            session,
            claim.fence,
            next_attempt_at=in_seconds(delay),
            download_attempts=failures,
            **claim.fetched,
            **kept,
        )
    log.warning(
        "job %s: %s; uploading again in %.0fs", job_id, exc, delay, extra={"event": "download.upload_retry"}
    )
    return "upload-retry"


def _write_failed(rt: Runtime, job_id: str, claim: DownloadClaim, exc: OutputWriteError) -> str:
    """The output could not be written here (disk full, read-only folder): pause the batch, and
    keep the job for when it can be.

    Not counted as a download attempt: the disk failed, not the download. A batch folder that
    cannot be placed (:class:`~jobs.outputs.OutputFolderError`: a link out of the output folder,
    a working folder removed) is the user's to fix: no room frees it, so its reason says so."""
    if isinstance(exc, OutputFolderError):
        then = "; the videos already made wait at fal and are downloaded by the next run, never made again"
    else:
        fix, once = _write_fix(exc)
        then = (
            f" — {fix}; the videos already made wait at fal and are downloaded once {once} (the batch "
            "then resumes by itself) or by the next run, never made again"
        )
    return _pause_for_outputs(
        rt,
        job_id,
        claim,
        f"{store.OUTPUTS_PAUSE_PREFIX}be written here: {exc}{then}",
        cancelled=f"{CANCELLED_UNSTORED}: this paid video was not kept and nothing downloads it now "
        "(fal may still serve it for a while at the video URL of the job's recorded result; "
        f"`rerun --failed-only` would make and pay for it again); {exc}",
    )


def _probe_short(rt: Runtime, job_id: str, claim: DownloadClaim, path: Path, exc: OutputWriteError) -> str:
    """The saved video could not be probed because of this machine (short of a resource, a disk
    that failed the read: :class:`worker.probe.LocalProbeError`): keep the file and the job, pause
    the batch with the fix, as :func:`_write_failed` does for a disk that cannot keep outputs."""
    fix, once = _write_fix(exc)
    return _pause_for_outputs(
        rt,
        job_id,
        claim,
        f"{store.OUTPUTS_PAUSE_PREFIX}be checked here: {exc} — {fix}; the video is kept at {path} and "
        f"checked again once {once} (the batch then resumes by itself) or by the next run, never made again",
        cancelled=f"{CANCELLED_UNSTORED}: this paid video was downloaded to {path} but could not be "
        f"checked; {exc}",
    )


def _write_fix(exc: OutputWriteError) -> tuple[str, str]:
    """What to do about an output that could not be written, by the operating system's error
    behind it, and when the videos waiting at fal are downloaded: "free space or fix
    WANBATCH_OUTPUT_DIR" is the fix of a full disk, not of a process out of file descriptors
    (raise its open-file limit), of a folder where the file goes, of a read-only mount
    (``EROFS``: no space freed heals it, remounting does), of a disk that fails its reads or
    writes (``EIO``: no space freed heals it either), or of a folder this process may not
    write in (``EACCES``/``EPERM``: its permissions or owner). The errno meanings are POSIX's
    (https://man7.org/linux/man-pages/man3/errno.3.html)."""
    if (short := out_of_files(exc)) is not None:
        return f"{short[0]}: {short[1]}", "they can be written"
    code = os_errno(exc)
    if (short_of := local_resource_errno(exc)) is not None:
        return (
            f"this machine ran short of memory or another resource ({errno.errorcode[short_of]}): "
            "free memory, or raise this process's limits (`ulimit -v`, a container's memory limit)",
            "there is enough",
        )
    if code == errno.EISDIR:
        return (
            "a folder is in the way where the output file goes: move or remove it, or fix "
            "WANBATCH_OUTPUT_DIR",
            "they can be written",
        )
    if code == errno.EROFS:
        return (
            "the output folder is on a read-only file system (EROFS): remount it read-write, or "
            "point WANBATCH_OUTPUT_DIR at a writable folder",
            "they can be written",
        )
    if code == errno.EIO:
        return (
            "the output folder's disk failed a read or a write (EIO, an I/O error): check that "
            "disk and its mount (the kernel's log says more), or point WANBATCH_OUTPUT_DIR at "
            "another disk",
            "they can be written",
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            "this process may not write in the output folder (permission denied): fix its "
            "permissions or owner for the user wanbatch runs as, or point WANBATCH_OUTPUT_DIR at a "
            "writable folder",
            "they can be written",
        )
    return "free space or fix WANBATCH_OUTPUT_DIR", "there is room"


#: How the error of a job whose output could not be kept in a cancelled batch starts.
CANCELLED_UNSTORED = "the batch was cancelled while its outputs could not be stored"


def _pause_for_outputs(
    rt: Runtime,
    job_id: str,
    claim: DownloadClaim,
    reason: str,
    *,
    cancelled: str,
    **fields: Any,
) -> str:
    """Outputs cannot be kept: pause the job's batch with ``reason``, and keep the job.

    The video was made and billed, and fal (or the staging folder) still has it, so the job is
    not failed: it waits in ``downloading``, its lease given back, tried again after
    ``WANBATCH_RETRY_MAX_DELAY``. Its batch is paused: every job sent meanwhile would be paid for
    and meet the same disk or storage. The first such try that stores its output ends the pause
    (:func:`jobs.store.resume_after_outputs_stored`: workers run on with nobody to resume the
    batch); running the batch again once that is fixed resumes it and tries what waits at once
    (:func:`jobs.store.resume_batch`). A video fal no longer serves by then fails with that
    reason. A cancelled batch has no next run to wait for: the job fails there with its billed
    cost and ``cancelled`` as its error — not ``reason``, whose "wait … by the next run" a
    cancelled batch never keeps (``run`` refuses it): it says where the paid video is, if kept.

    Only the try that pauses the batch warns, with ``reason``: the batch's other waiting jobs,
    and each of their later tries, are told at INFO in one short line. Every job used to repeat
    the ~500-character warning at every try (37 lines for 18 jobs of a batch paused already).
    A batch paused for something else (``wanbatch pause``, a budget, fal refusing the key) is not
    paused again, and its ``pause_reason`` says nothing of the storage: its first such try warns
    then, once for the batch (:attr:`Runtime.outputs_unstored_said`), as the pause would have —
    else nobody heard that its outputs cannot be stored (a full disk said only at INFO), and an
    operator who resumed it learnt of it only when its jobs failed again. Said again after an
    output of the batch was stored (the storage took one: its next trouble is news)."""
    paused = other = False
    with db.session_scope(rt.engine) as session:
        batch = store.get_batch(session, claim.batch_id)
        if batch.state == BatchState.CANCELLED:
            return _fail_paid(
                session, claim, error=cancelled, error_type="output_not_kept", **claim.fetched, **fields
            )
        if batch.state == BatchState.ACTIVE:
            store.set_batch_state(session, claim.batch_id, BatchState.PAUSED, reason=reason)
            paused = True
        else:  # paused for something else: its reason says nothing of the storage
            other = not (batch.pause_reason or "").startswith(store.OUTPUTS_PAUSE_PREFIX)
        kept = store.release_lease(
            session,
            claim.fence,
            next_attempt_at=in_seconds(rt.settings.retry_max_delay),
            **claim.fetched,
            **fields,
        )
    if not kept:
        return "lost-lease"
    if paused or (other and _first_to_say(rt, claim.batch_id)):
        log.warning(
            "job %s: its output cannot be stored now; batch %s: %s",
            job_id,
            "paused" if paused else "paused already, for another reason; it waits with it",
            reason,
            extra={"event": "download.outputs_paused", "job_id": job_id, "batch_id": claim.batch_id},
        )
    else:
        log.info(
            "job %s: its output cannot be stored yet; it waits with its paused batch (tried again in %.0fs)",
            job_id,
            rt.settings.retry_max_delay,
            extra={"event": "download.outputs_wait", "job_id": job_id, "batch_id": claim.batch_id},
        )
    return "outputs-paused"


#: Guards :attr:`Runtime.outputs_unstored_said` (:func:`_first_to_say`).
_UNSTORED_SAID = threading.Lock()


def _first_to_say(rt: Runtime, batch_id: str) -> bool:
    """Whether this try is the one to warn that the outputs of ``batch_id`` (paused for another
    reason) cannot be stored, marking it said: read and marked in one step, as a full disk fails
    every download under way at once, each on a thread of the pool, and each that read "not said
    yet" before another marked it warned too."""
    with _UNSTORED_SAID:
        if batch_id in rt.outputs_unstored_said:
            return False
        rt.outputs_unstored_said.add(batch_id)
        return True


#: How many times a job's download step may crash in one process (an exception no step expects:
#: a bug) before its batch is paused (:func:`crashed`).
CRASH_LIMIT = 3

#: The ``error_type`` of a job whose download kept crashing in a cancelled batch.
DOWNLOAD_CRASHED = "download_crashed"


def crashed(rt: Runtime, job_id: str, exc: BaseException, details: str | None) -> str:
    """The download step of ``job_id`` crashed on ``exc`` (a bug, already reported with its
    traceback in the file ``details``): bound what follows, so that a bug never hangs a run.

    Left as it was, the job kept its lease, the tick took it again once the lease ran out, and
    the step crashed again — for ever: the run never ended, the batch never paused, and the
    stuck jobs filled the download backlog. Instead the lease is given back at once, the job due
    again after the usual backoff; at the :data:`CRASH_LIMIT`-th crash in this process its
    batch is paused with the reason (naming the crash file): ``run`` ends (exit 2) and
    ``status`` says why. The job is not failed: its video was made and paid for, and it waits
    in ``downloading`` — at fal, or already in the output folder — for the next run (after an
    upgrade that fixes the bug), which downloads it without sending anything again. A failed
    job could only be rendered, and paid for, again. In a cancelled batch, which has no next
    run, the job fails with ``error_type`` ``download_crashed`` (not fal's ``internal_error``,
    which the billing rules read as fal's own 500) and its billed cost.

    Returns what happened (``crash-retry``, ``crash-paused``, ``failed``, or ``left`` when the
    job is no longer this process's to give back). The count is per process (a distributed
    worker counts its own), and starts over once the batch is paused.
    """
    crashes = rt.download_crashes.get(job_id, 0) + 1
    where = f" (details in {details})" if details else ""
    with db.session_scope(rt.engine) as session:
        job = store.get_job(session, job_id)
        if job.state != S.DOWNLOADING or job.lease_owner not in (None, DOWNLOAD_QUEUE, rt.owner):
            rt.download_crashes.pop(job_id, None)
            return "left"  # finished meanwhile, or another worker holds it now
        fence = rt.fence(job)
        if crashes < CRASH_LIMIT:
            if len(rt.download_crashes) >= 1024:
                rt.download_crashes.clear()
            rt.download_crashes[job_id] = crashes
            store.release_lease(session, fence, next_attempt_at=in_seconds(backoff(rt.settings, crashes)))
            return "crash-retry"
        rt.download_crashes.pop(job_id, None)
        what = f"the download of job {job_id} crashed {crashes} times: {summary(exc)}"
        what += f"; please report it{where}"
        batch = store.get_batch(session, job.batch_id)
        if batch.state == BatchState.CANCELLED:
            paid = billed(job, billing.Outcome.SUCCEEDED)
            cost = nothing_more(job) if job.reused_from is not None else paid
            failed = store.fail_job(session, fence, error=what, error_type=DOWNLOAD_CRASHED, **cost)
            return "failed" if failed else "lost-lease"
        reason = (
            f"{what} — the batch is paused so that nothing more is sent; its paid videos wait (at "
            "fal, or in the output folder) and the next run downloads them, never makes them again"
        )
        if batch.state == BatchState.ACTIVE:
            store.set_batch_state(session, job.batch_id, BatchState.PAUSED, reason=reason)
        store.release_lease(session, fence, next_attempt_at=in_seconds(rt.settings.retry_max_delay))
    log.warning(
        "job %s: its download keeps crashing; batch paused: %s",
        job_id,
        reason,
        extra={"event": "download.crash_paused", "job_id": job_id, "batch_id": job.batch_id},
    )
    return "crash-paused"


def _fail_paid(session: Session, claim: DownloadClaim, *, error: str, error_type: str, **fields: Any) -> str:
    """Fail a job whose video fal made, and billed, but that we could not get or keep: the job
    carries what fal billed (a COMPLETED request without an error is paid for) — nothing more for
    a rerun's job that took the staged video of another (``reused_from``): that one was billed
    (:func:`nothing_more`). Returns the step's outcome: ``failed``, or ``lost-lease`` when the
    job moved meanwhile (nothing was written)."""
    job = store.get_job(session, claim.fence.job_id)
    cost = nothing_more(job) if job.reused_from is not None else billed(job, billing.Outcome.SUCCEEDED)
    failed = store.fail_job(session, claim.fence, error=error, error_type=error_type, **fields, **cost)
    return "failed" if failed else "lost-lease"


def sidecar_record(
    job: JobView,
    batch_name: str,
    video_path: str,
    sha256: str,
    size: int,
    cost: dict[str, Any],
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
        "billing_units": str(cost["actual_billing_units"]),
        "cost_usd": str(cost["actual_usd"]),
        "est_billing_units": str(job.est_billing_units),
        "est_usd": str(job.est_usd),
        "attempts": job.attempts,
        "video_path": video_path,  # relative to WANBATCH_OUTPUT_DIR, or the s3:// URI
        "video_sha256": sha256,
        "video_bytes": size,
    }
