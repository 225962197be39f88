"""What every step runs with: the runtime (database, fal client, settings, limits), the
worker's identity for leases, and how a stored job becomes a request handle again."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Engine

from jobs.models import Job
from jobs.settings import Settings
from jobs.states import JobState
from worker.fal.client import FalClient
from worker.fal.models import RequestHandle
from worker.fal.storage import MediaPreparer
from worker.limits import SubmitLimiter, limiter_for

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


def handle_of(job: Job, queue_url: str) -> RequestHandle:
    assert job.request_id is not None
    if job.status_url and job.response_url and job.cancel_url:
        return RequestHandle(job.endpoint, job.request_id, job.status_url, job.response_url, job.cancel_url)
    return RequestHandle.from_request_id(queue_url, job.endpoint, job.request_id)
