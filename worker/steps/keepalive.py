"""Keeps the lease of every submit whose POST is in flight, so a slow answer from fal is never
taken for a lost worker.

The reconciler takes a ``submitting`` job whose lease ran out for one whose worker died during
the POST: its outcome becomes unknown, and without a webhook receiver the job fails (or is sent
again) at once. But a POST may well take longer than ``WANBATCH_LEASE_SECONDS``: up to the
connect timeout plus the read timeout, and longer while fal holds its answer back. The worker,
alive all along, then got fal's acceptance for a job that had moved on — a paid request whose
video nobody downloads, or a second one paid for the same job.

Downloads renew their lease as bytes arrive (``worker.steps.download._LeaseKeeper``); a POST
has no bytes to count, so one thread per runtime renews the leases of all its POSTs in flight,
each a third of a lease after it was taken or last renewed. Every renewal is fenced by the
version and owner the step took the lease with (:func:`jobs.store.extend_lease`): a lease that
was really taken over — the worker stalled past it, or could not reach the database for a
whole lease — is never taken back; the step's late answer is then settled by
:mod:`worker.steps.late_answers`. The thread exists only while a POST is in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine

from jobs import db, store
from jobs.models import utcnow
from jobs.store import Fence

log = logging.getLogger(__name__)

#: Longest wait before a renewal the database refused is tried again, in seconds.
RETRY_SECONDS = 1.0


@dataclass
class HeldLease:
    """One POST's lease as the keeper holds it."""

    fence: Fence
    #: When (``time.monotonic``) it is renewed next.
    due: float
    #: A renewal found the lease gone: someone else took the job over; no longer renewed.
    lost: bool = False


class SubmitLeases:
    """The leases of this runtime's POSTs in flight, renewed every third of a lease.

    Use :meth:`kept` around the POST; :meth:`close` when the runtime ends (a POST still in
    flight then keeps its lease only until it runs out, as a dead worker's would).
    """

    def __init__(self, engine: Engine, lease_seconds: float) -> None:
        self._engine = engine
        self._lease = lease_seconds
        self._every = lease_seconds / 3
        self._held: dict[str, HeldLease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @contextmanager
    def kept(self, fence: Fence) -> Iterator[HeldLease]:
        """Renew ``fence``'s lease (taken just now) for as long as the block runs."""
        held = HeldLease(fence, time.monotonic() + self._every)
        with self._lock:
            self._held[fence.job_id] = held
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(target=self._run, name="wanbatch-submit-leases", daemon=True)
                self._thread.start()
        try:
            yield held
        finally:
            with self._lock:
                if self._held.get(fence.job_id) is held:
                    del self._held[fence.job_id]

    def holding(self) -> list[str]:
        """The jobs whose leases are kept right now (for tests and logs)."""
        with self._lock:
            return list(self._held)

    def close(self) -> None:
        """Renew nothing any more; the thread ends at its next wake-up."""
        self._closed.set()

    def _run(self) -> None:
        """Until no POST is in flight: sleep to the next renewal due, then renew what is due."""
        while True:
            with self._lock:
                if not self._held or self._closed.is_set():
                    self._thread = None
                    return
                wait = min(h.due for h in self._held.values()) - time.monotonic()
            if self._closed.wait(max(0.0, wait)):
                continue
            try:
                self._renew_due()
            except Exception:  # a bug: said once per round, and the thread lives on
                log.exception(
                    "renewing the leases of POSTs in flight failed", extra={"event": "submit.renew_failed"}
                )
                with self._lock:
                    held = list(self._held.values())
                self._postpone(held, RETRY_SECONDS)

    def _renew_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [h for h in self._held.values() if h.due <= now]
        if not due:
            return
        try:
            with db.session_scope(self._engine) as session:
                kept = [
                    store.extend_lease(session, h.fence, now=utcnow(), lease_seconds=self._lease) for h in due
                ]
        except Exception as exc:
            if not db.is_unavailable(exc) and not db.is_disk_full(exc):
                raise
            # Tried again soon: the lease runs out only after a whole lease without a renewal.
            log.warning(
                "could not renew the lease of %d POST(s) in flight: the database is unavailable (%s); "
                "trying again",
                len(due),
                _first_line(exc),
                extra={"event": "submit.renew_failed"},
            )
            self._postpone(due, min(self._every, RETRY_SECONDS))
            return
        self._postpone(due, self._every)
        for held, ok in zip(due, kept, strict=True):
            if not ok:
                self._lost(held)

    def _postpone(self, held: list[HeldLease], seconds: float) -> None:
        due = time.monotonic() + seconds
        for h in held:
            h.due = due

    def _lost(self, held: HeldLease) -> None:
        """The lease moved on under a POST in flight: the worker stalled past it (or the step's
        own write just landed, when the POST had already returned: nothing to say then)."""
        with self._lock:
            if self._held.get(held.fence.job_id) is not held:
                return
            del self._held[held.fence.job_id]
        held.lost = True
        log.warning(
            "job %s: its lease was taken over while its POST was in flight; fal's answer, when it "
            "comes, is recorded on the job's history",
            held.fence.job_id,
            extra={"event": "submit.lease_lost", "job_id": held.fence.job_id},
        )


def _first_line(exc: BaseException) -> str:
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
