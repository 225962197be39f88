"""Download: fetch a completed job's result, then its video, then write the sidecar and
finish. A failed download is retried; a paid output is never regenerated."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from jobs import billing, store
from jobs.errors import (
    FinalProviderError,
    ProviderError,
    RetryableProviderError,
)
from jobs.models import Job, utcnow
from worker import chaos, outputs
from worker.fal.errors import ResultNotReadyError
from worker.fal.storage import download as download_file
from worker.steps.context import DOWNLOAD_QUEUE, Runtime, S, handle_of
from worker.steps.failures import backoff, billed, cost_of_failure, describe, retry_or_fail

log = logging.getLogger(__name__)


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
        handle = handle_of(job, rt.settings.fal_queue_url)
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
                    **cost_of_failure(job, exc),
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
                retry_or_fail(
                    session,
                    rt,
                    job,
                    S.DOWNLOADING,
                    version,
                    exc,
                    utcnow(),
                    **cost_of_failure(job, exc),
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
            allowed_hosts=rt.settings.download_allowed_hosts,
        )
    except ProviderError as exc:
        failures = download_failures + 1
        with store.session_scope(rt.engine) as session:
            # A final error (the file expired, the host is not allowed) cannot heal: fail now.
            if isinstance(exc, FinalProviderError) or failures >= rt.settings.download_attempts:
                job = store.get_job(session, job_id)
                store.transition(
                    session, job_id, S.DOWNLOADING, S.FAILED, expected_version=version,
                    reason=f"download failed {failures} time(s): {exc}", worker=rt.owner,
                    error=f"download failed {failures} time(s): {exc}", error_type="download_failed",
                    download_attempts=failures,
                    # fal produced (and billed) the output even though we could not fetch it
                    **billed(job, billing.Outcome.SUCCEEDED),
                )  # fmt: skip
                return "failed"
            store.update_job_fields(
                session,
                job_id,
                expected_version=version,
                download_attempts=failures,
                lease_owner=None,
                lease_expires_at=None,
                next_attempt_at=utcnow() + timedelta(seconds=backoff(rt.settings, failures)),
            )
        return "download-retry"

    chaos.crash_point("after_download")
    with store.session_scope(rt.engine) as session:
        job = store.get_job(session, job_id)
        cost = billed(job, billing.Outcome.SUCCEEDED)
        sidecar = sidecar_record(
            job, batch_name, result.path, result.sha256, result.size, rt.settings.output_dir, cost
        )
        outputs.write_json_atomic(outputs.sidecar_path(result.path), sidecar)
        store.transition(
            session, job_id, S.DOWNLOADING, S.SUCCEEDED, expected_version=version,
            reason="downloaded", worker=rt.owner,
            output_path=str(result.path), output_sha256=result.sha256, output_bytes=result.size,
            error=None, error_type=None, **cost,
        )  # fmt: skip
    return "succeeded"


def sidecar_record(
    job: Job,
    batch_name: str,
    video: Path,
    sha256: str,
    size: int,
    output_dir: Path,
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
        "video_path": outputs.relative_to_output(video, output_dir),
        "video_sha256": sha256,
        "video_bytes": size,
    }
