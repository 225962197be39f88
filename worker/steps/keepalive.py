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

The same keeper holds the lease of a download from its claim until its output is stored
(``Runtime.output_leases``, :func:`worker.steps.download._store_video`): an upload to object
storage reads its whole body before it waits for the answer, and a slow storage answered after
the lease had run out — the job was taken over and uploaded again, for ever. That keeper's thread
lingers a third of a lease once idle, so that downloads one after the other reuse it (no thread
per job), and it says nothing of a lease it finds gone: the download step does, once it knows
whether its output was stored (the step's own success moves the version on too).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine

from jobs import db, store
from jobs.models import utcnow
from jobs.printable import first_line
from jobs.store import Fence

log = logging.getLogger(__name__)

#: Longest wait before a renewal the database refused is tried again, in seconds.
RETRY_SECONDS = 1.0


@dataclass
class HeldLease:
    """One step's lease as the keeper holds it."""

    fence: Fence
    #: When (``time.monotonic``) it is renewed next.
    due: float
    #: A renewal found the lease gone: someone else took the job over; no longer renewed.
    lost: bool = False


class StepLeases:
    """The leases of this runtime's steps that wait on someone else (a POST in flight, an
    output being stored), renewed every third of a lease.

    Use :meth:`kept` around the wait; :meth:`close` when the runtime ends (a step still waiting
    then keeps its lease only until it runs out, as a dead worker's would). ``what`` names the
    thread and the log events; ``linger``: how long the thread waits for the next step once
    none is held (0: it ends at once); ``warn_lost``: whether a lease found gone is logged here
    (the POST's), or only flagged on its :class:`HeldLease` for the step to say.
    """

    def __init__(
        self,
        engine: Engine,
        lease_seconds: float,
        *,
        what: str = "submit",
        linger: float = 0.0,
        warn_lost: bool = True,
    ) -> None:
        self._engine = engine
        self._lease = lease_seconds
        self._every = lease_seconds / 3
        self._what = what
        self._linger = linger
        self._warn_lost = warn_lost
        self._held: dict[str, HeldLease] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        #: While the thread waits (under ``_lock``): the time (``time.monotonic``) it looks again
        #: by itself; ``-inf`` while it does not wait — it reads ``_held`` before its next wait.
        #: A step held later than that needs no wake-up (:meth:`kept`).
        self._wakes_at = -math.inf

    @contextmanager
    def kept(self, fence: Fence) -> Iterator[HeldLease]:
        """Renew ``fence``'s lease (taken or renewed just now) for as long as the block runs."""
        held = HeldLease(fence, time.monotonic() + self._every)
        with self._lock:
            self._held[fence.job_id] = held
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name=f"wanbatch-{self._what}-leases", daemon=True
                )
                self._thread.start()
            elif held.due < self._wakes_at:
                # The thread sleeps past this lease's renewal (it lingers longer than a third of
                # a lease): wake it. Otherwise it wakes in time by itself, for an earlier renewal
                # or its linger's end — a wake-up for every step held cost each POST and each
                # download a thread hand-off (and a turn of the GIL) for nothing.
                self._wake.notify()
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
        """Renew nothing any more; the thread ends at once."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def _run(self) -> None:
        """Until no step is held (for ``linger`` seconds): sleep to the next renewal due, then
        renew what is due."""
        while True:
            with self._lock:
                if not self._held and not self._closed and self._linger > 0:
                    self._sleep(self._linger)
                if not self._held or self._closed:
                    self._thread = None
                    return
                wait = min(h.due for h in self._held.values()) - time.monotonic()
                if wait > 0:
                    self._sleep(wait)
                    continue  # woken early (a step due sooner, or closed), or due now: look again
            try:
                self._renew_due()
            except Exception:  # a bug: said once per round, and the thread lives on
                log.exception(
                    "renewing the leases of %s steps failed",
                    self._what,
                    extra={"event": f"{self._what}.renew_failed"},
                )
                with self._lock:
                    held = list(self._held.values())
                self._postpone(held, RETRY_SECONDS)

    def _sleep(self, seconds: float) -> None:
        """Wait (``_lock`` held) up to ``seconds``, or until :meth:`kept` or :meth:`close` wakes
        the thread; :meth:`kept` does only for a lease due before then (``_wakes_at``)."""
        self._wakes_at = time.monotonic() + seconds
        try:
            self._wake.wait(seconds)
        finally:
            self._wakes_at = -math.inf

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
                "could not renew the lease of %d %s step(s): the database is unavailable (%s); trying again",
                len(due),
                self._what,
                first_line(exc),
                extra={"event": f"{self._what}.renew_failed"},
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
        if not self._warn_lost:
            return
        log.warning(
            "job %s: its lease was taken over while its POST was in flight; fal's answer, when it "
            "comes, is recorded on the job's history",
            held.fence.job_id,
            extra={"event": "submit.lease_lost", "job_id": held.fence.job_id},
        )


#: The keeper of POSTs in flight, by its first name.
SubmitLeases = StepLeases
