"""The typed values the fal queue client hands back: handles, submit results, statuses, cancels.

They are plain frozen dataclasses so they can be compared in tests, logged (none of them holds the
API key) and rebuilt from a request id stored in the database after a worker restart.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import httpx

from jobs.endpoints.registry import app_base
from worker.fal.http import origin

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
QUEUE_STATES: tuple[QueueState, ...] = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")

#: A request id we will put in a URL path. fal's are UUIDs (``80e732af-…``, see
#: https://docs.fal.ai/model-endpoints/queue); this admits those and any other plain
#: token, never a ``/``, ``..``, ``?`` or ``#`` that would point the URL somewhere else.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def valid_request_id(value: object) -> bool:
    """Whether ``value`` can safely name a request in a queue URL."""
    return isinstance(value, str) and REQUEST_ID_PATTERN.fullmatch(value) is not None


def request_id_or_none(value: object) -> str | None:
    """``value`` when it has a request id's shape (:func:`valid_request_id`), else None.

    For the ids fal only reports (``gateway_request_id``, ``x-fal-request-id`` on an error): one
    of another shape is not fal's, so it is dropped rather than stored, shown or exported.
    """
    return value if isinstance(value, str) and valid_request_id(value) else None


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

    @classmethod
    def trusted(
        cls,
        queue_url: str,
        endpoint_id: str,
        request_id: str,
        *,
        status_url: str | None = None,
        response_url: str | None = None,
        cancel_url: str | None = None,
    ) -> RequestHandle:
        """The handle of a request, never pointing anywhere but the configured queue.

        The URLs a submit answer (or an old database row) names are kept only when all three
        are on the queue URL's origin (scheme, host, port), under its path, and end in
        ``/requests/{request_id}`` (+ ``/status``, + ``/cancel``) — as fal's own answers do,
        e.g. under the app root ``fal-ai/wan`` for ``fal-ai/wan/v2.6/…``. Otherwise they are
        derived with :meth:`from_request_id`. The client sends the key with status, result and
        cancel calls, so a URL on another host must never be followed.

        URLs that are exactly the derived ones (as fal's answers and the simulator's are) give
        that handle without being parsed: it is the handle either way, and httpx parses a URL a
        character at a time (three URLs were about 750 Python calls a job).
        """
        try:
            derived: RequestHandle | None = cls.from_request_id(queue_url, endpoint_id, request_id)
        except ValueError:  # not an endpoint id: raised below, unless the answer's URLs are kept
            derived = None
        if derived is not None and (status_url, response_url, cancel_url) == (
            derived.status_url,
            derived.response_url,
            derived.cancel_url,
        ):
            return derived
        if (
            status_url
            and response_url
            and cancel_url
            and _on_queue(status_url, queue_url, request_id, "/status")
            and _on_queue(response_url, queue_url, request_id, "")
            and _on_queue(cancel_url, queue_url, request_id, "/cancel")
        ):
            return cls(endpoint_id, request_id, status_url, response_url, cancel_url)
        return derived or cls.from_request_id(queue_url, endpoint_id, request_id)


@functools.lru_cache(maxsize=16)
def _queue_root(queue_url: str) -> tuple[tuple[str, str, int | None], str] | None:
    """The queue URL's origin and path prefix, parsed once (None when it does not parse)."""
    try:
        queue = httpx.URL(queue_url)
        return origin(queue), queue.raw_path.decode("ascii", "replace").rstrip("/") + "/"
    except (httpx.InvalidURL, TypeError, ValueError):  # ValueError: a host IDNA cannot decode
        return None


@functools.lru_cache(maxsize=4096)
def _on_queue(url: str | None, queue_url: str, request_id: str, suffix: str) -> bool:
    """Whether ``url`` is ``{queue_url}/…/requests/{request_id}{suffix}`` on the queue's origin.

    Pure, so cached: a job's handle is rebuilt for every status, result and cancel call, and
    parsing URLs was a measurable share of the CPU a job costs.
    """
    if not url or not valid_request_id(request_id):
        return False
    root = _queue_root(queue_url)
    if root is None:
        return False
    queue_origin, prefix = root
    try:
        parsed = httpx.URL(url)
        same_origin = origin(parsed) == queue_origin
    except (httpx.InvalidURL, TypeError, ValueError):  # ValueError: a host IDNA cannot decode
        return False
    path = parsed.raw_path.decode("ascii", "replace")
    return (
        same_origin
        and not parsed.userinfo
        and not parsed.query
        and not parsed.fragment
        and "/../" not in path + "/"
        and "/./" not in path + "/"
        and path.startswith(prefix)
        and path.endswith(f"/requests/{request_id}{suffix}")
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
    #: Its MP4 boxes were walked as it was written, and tile it whole (``worker.fal.storage``'s
    #: truncation check): the probe need not open it and walk them again.
    whole: bool = False
