"""The simulator's books: what fal would know (and bill) that the client may not.

Tests check wanbatch's invariants against this ledger rather than against wanbatch's own
records: every accepted submit (even one whose response the client never saw), what was
billed, which inputs were accepted twice (a paid duplicate), the most requests ever
outstanding at once, the submit rate per second, how many calls clients made on requests
(``calls``: ``status`` polls, ``stream`` subscriptions, ``result`` fetches, ``cancel`` requests),
and how many output-file GETs were answered (``downloads``), and the most at once
(``max_downloads_in_flight``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypedDict

from falsim.faults import FaultsSnapshot
from falsim.webhooks import DeliveryRecord


class EntryRecord(TypedDict):
    """A :class:`LedgerEntry` as JSON (Decimals as strings, to keep cents exact)."""

    request_id: str
    endpoint: str
    input_sha256: str
    accepted_at: float
    priority: str
    start_timeout: float | None
    fallbacks_disabled: bool
    webhook_url: str | None
    client_saw_response: bool
    started_at: float | None
    completed_at: float | None
    outcome: str | None
    status_code: int | None
    error_type: str | None
    seed: int | None
    billed: bool
    billing_units: str
    usd: str
    output_sha256: str | None
    encode_seconds: float | None


class DuplicateRecord(TypedDict):
    """The same input accepted more than once for an endpoint: a paid duplicate."""

    endpoint: str
    input_sha256: str
    request_ids: list[str]


class RejectionRecord(TypedDict):
    """A refused submit, as JSON."""

    at: float
    endpoint: str
    status_code: int
    reason: str


class LedgerSnapshot(TypedDict):
    """:meth:`Ledger.snapshot`: the entries and the counters; see the module docstring."""

    entries: list[EntryRecord]
    accepted: int
    completed: int
    billed_count: int
    billed_usd: str
    billed_units: str
    duplicates: list[DuplicateRecord]
    outstanding: int
    max_outstanding: int
    in_progress: int
    max_in_progress: int
    submit_times: list[float]
    submits_per_second: dict[str, int]
    max_submits_per_second: int
    rejections: list[RejectionRecord]
    calls: dict[str, int]
    downloads: int
    max_downloads_in_flight: int


class LedgerReport(LedgerSnapshot):
    """The whole ledger (``GET /_sim/ledger``, ``SimulatorHandle.ledger()``): the snapshot, the
    webhook deliveries, the faults (rules and how often each fired) and every render's time."""

    webhooks: list[DeliveryRecord]
    faults: FaultsSnapshot
    encode_seconds: list[float]


@dataclass
class LedgerEntry:
    """One accepted submit and what became of it."""

    request_id: str
    endpoint: str
    input_sha256: str
    accepted_at: float
    priority: str = "normal"
    #: The ``X-Fal-Request-Start-Timeout`` the submit carried (seconds), if any.
    start_timeout: float | None = None
    #: Whether the submit carried ``X-Fal-Disable-Fallbacks: true``.
    fallbacks_disabled: bool = False
    webhook_url: str | None = None
    #: False when a fault kept the submit response from the client (dropped or stalled).
    client_saw_response: bool = True
    started_at: float | None = None
    completed_at: float | None = None
    #: ``ok``, ``error`` (model/infra error), ``invalid`` (422), ``cancelled``, ``timeout`` (start timeout).
    outcome: str | None = None
    status_code: int | None = None
    error_type: str | None = None
    seed: int | None = None
    billed: bool = False
    billing_units: Decimal = Decimal(0)
    usd: Decimal = Decimal(0)
    output_sha256: str | None = None
    encode_seconds: float | None = None

    def as_dict(self) -> EntryRecord:
        """JSON-ready (Decimals as strings, to keep cents exact)."""
        return {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "input_sha256": self.input_sha256,
            "accepted_at": self.accepted_at,
            "priority": self.priority,
            "start_timeout": self.start_timeout,
            "fallbacks_disabled": self.fallbacks_disabled,
            "webhook_url": self.webhook_url,
            "client_saw_response": self.client_saw_response,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "outcome": self.outcome,
            "status_code": self.status_code,
            "error_type": self.error_type,
            "seed": self.seed,
            "billed": self.billed,
            "billing_units": str(self.billing_units),
            "usd": str(self.usd),
            "output_sha256": self.output_sha256,
            "encode_seconds": self.encode_seconds,
        }


@dataclass
class Rejection:
    """A submit that was refused (nothing queued, nothing billed)."""

    at: float
    endpoint: str
    status_code: int
    reason: str


@dataclass
class Ledger:
    """All entries plus the running counters. Guarded by one lock: tests read it from other threads."""

    entries: dict[str, LedgerEntry] = field(default_factory=dict)
    rejections: list[Rejection] = field(default_factory=list)
    submit_times: list[float] = field(default_factory=list)
    outstanding: int = 0
    max_outstanding: int = 0
    in_progress: int = 0
    max_in_progress: int = 0
    calls: Counter[str] = field(default_factory=Counter)
    downloads: int = 0
    downloads_in_flight: int = 0
    max_downloads_in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def accept(self, entry: LedgerEntry) -> None:
        """Record an accepted submit: it is outstanding until it completes."""
        with self._lock:
            self.entries[entry.request_id] = entry
            self.submit_times.append(entry.accepted_at)
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)

    def reject(self, endpoint: str, status_code: int, reason: str) -> None:
        """Record a refused submit."""
        with self._lock:
            self.rejections.append(Rejection(time.time(), endpoint, status_code, reason))

    def started(self, request_id: str) -> None:
        """The request left the queue for a runner."""
        with self._lock:
            self.entries[request_id].started_at = time.time()
            self.in_progress += 1
            self.max_in_progress = max(self.max_in_progress, self.in_progress)

    def completed(self, request_id: str, was_running: bool, **result: Any) -> None:
        """The request reached COMPLETED (successfully or not); ``result`` sets entry fields."""
        with self._lock:
            entry = self.entries[request_id]
            entry.completed_at = time.time()
            for name, value in result.items():
                setattr(entry, name, value)
            self.outstanding -= 1
            if was_running:
                self.in_progress -= 1

    def download_began(self) -> None:
        """An output-file GET is being answered (held by ``download_slow``, read, sent)."""
        with self._lock:
            self.downloads += 1
            self.downloads_in_flight += 1
            self.max_downloads_in_flight = max(self.max_downloads_in_flight, self.downloads_in_flight)

    def download_ended(self) -> None:
        """An output-file GET was answered."""
        with self._lock:
            self.downloads_in_flight -= 1

    def reset_downloads(self) -> None:
        """Count the output-file GETs from here on (a test of one command's downloads)."""
        with self._lock:
            self.downloads = 0
            self.max_downloads_in_flight = self.downloads_in_flight

    def count_call(self, kind: str) -> None:
        """A client called the request API (``status``, ``stream``, ``result``, ``cancel``, ``other``)."""
        with self._lock:
            self.calls[kind] += 1

    def mark_unseen(self, request_id: str) -> None:
        """The client never got the submit response (a dropped or stalled connection)."""
        with self._lock:
            self.entries[request_id].client_saw_response = False

    def snapshot(self) -> LedgerSnapshot:
        """Everything, JSON-ready; see the module docstring for what each key is for."""
        with self._lock:
            entries = [e.as_dict() for e in self.entries.values()]
            groups: dict[tuple[str, str], list[str]] = {}
            for e in self.entries.values():
                groups.setdefault((e.endpoint, e.input_sha256), []).append(e.request_id)
            per_second = Counter(int(t) for t in self.submit_times)
            billed = [e for e in self.entries.values() if e.billed]
            return {
                "entries": entries,
                "accepted": len(self.entries),
                "completed": sum(1 for e in self.entries.values() if e.completed_at is not None),
                "billed_count": len(billed),
                "billed_usd": str(sum((e.usd for e in billed), Decimal(0))),
                "billed_units": str(sum((e.billing_units for e in billed), Decimal(0))),
                "duplicates": [
                    DuplicateRecord(endpoint=ep, input_sha256=h, request_ids=ids)
                    for (ep, h), ids in groups.items()
                    if len(ids) > 1
                ],
                "outstanding": self.outstanding,
                "max_outstanding": self.max_outstanding,
                "in_progress": self.in_progress,
                "max_in_progress": self.max_in_progress,
                "submit_times": list(self.submit_times),
                "submits_per_second": {str(k): v for k, v in sorted(per_second.items())},
                "max_submits_per_second": max(per_second.values(), default=0),
                "rejections": [
                    RejectionRecord(at=r.at, endpoint=r.endpoint, status_code=r.status_code, reason=r.reason)
                    for r in self.rejections
                ],
                "calls": dict(self.calls),
                "downloads": self.downloads,
                "max_downloads_in_flight": self.max_downloads_in_flight,
            }
