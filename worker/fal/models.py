"""The typed values the fal queue client hands back: handles, submit results, statuses, cancels.

They are plain frozen dataclasses so they can be compared in tests, logged (none of them holds the
API key) and rebuilt from a request id stored in the database after a worker restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from jobs.endpoints.registry import app_base

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
QUEUE_STATES: tuple[QueueState, ...] = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")


@dataclass(frozen=True, slots=True)
class RequestHandle:
    """Everything needed to follow one queued request: where to ask for status, result, cancel.

    Built from the submit response (the server's own URLs) or, after a restart, from the stored
    request id with :meth:`from_request_id`, exactly as fal's clients derive them.
    """

    endpoint_id: str
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str

    @classmethod
    def from_request_id(cls, queue_url: str, endpoint_id: str, request_id: str) -> RequestHandle:
        """Derive the URLs from ``owner/alias`` (the endpoint's sub-path is dropped, as fal does).

        ``fal-ai/wan-25-preview/image-to-video`` → ``{queue}/fal-ai/wan-25-preview/requests/{id}``.
        """
        base = f"{queue_url.rstrip('/')}/{app_base(endpoint_id)}/requests/{request_id}"
        return cls(
            endpoint_id=endpoint_id,
            request_id=request_id,
            status_url=f"{base}/status",
            response_url=base,
            cancel_url=f"{base}/cancel",
        )


@dataclass(frozen=True, slots=True)
class Submitted:
    """A submit fal accepted: the handle plus what the submit response said about the queue.

    ``gateway_request_id`` differs from ``request_id`` when fal retried the request internally;
    ``request_id`` is the one the queue API understands (fal's webhook docs).
    """

    handle: RequestHandle
    status: QueueState
    queue_position: int | None = None
    gateway_request_id: str | None = None

    @property
    def request_id(self) -> str:
        return self.handle.request_id

    @property
    def status_url(self) -> str:
        return self.handle.status_url

    @property
    def response_url(self) -> str:
        return self.handle.response_url

    @property
    def cancel_url(self) -> str:
        return self.handle.cancel_url


@dataclass(frozen=True, slots=True)
class Status:
    """One status answer. fal has no FAILED state: a failure is COMPLETED with ``error`` set.

    ``logs`` is ``None`` when logs were not requested (or not sent), else the list fal returned.
    ``raw`` keeps the whole body for the job's event record.
    """

    state: QueueState
    queue_position: int | None = None
    logs: list[dict[str, Any]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.state == "COMPLETED"

    @property
    def failed(self) -> bool:
        """COMPLETED with an error: the result endpoint will replay the model's error."""
        return self.completed and (self.error is not None or self.error_type is not None)


class CancelOutcome(StrEnum):
    """What a cancel achieved. fal answers 2xx, 400 (too late) or 404 (unknown id)."""

    REQUESTED = "requested"
    ALREADY_COMPLETED = "already_completed"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class DownloadResult:
    """A downloaded output under its final name, with the hash computed while it streamed."""

    path: Path
    sha256: str
    size: int
