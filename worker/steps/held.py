"""Marks in the database the jobs whose accepted submission this process holds in its journal,
so that no other process calls their outcome unknown, nor sends them again, while it lives.

When fal accepted a submit but the database refused to record its request id (a trigger, a
constraint, a value out of range, a bug: :mod:`worker.steps.unrecorded`), only the process that
sent it knows that id, kept in its journal on its own host. Its own reconciler leaves the job
alone; but the job's lease runs out all the same, and the reconciler of any *other* process —
the distributed workers' tick leader on another host, a second ``run`` — took it for a submit
whose worker was lost during the POST: "submission outcome unknown", and by
``WANBATCH_SUBMIT_UNKNOWN_POLICY=resubmit`` sent again and paid for twice (by ``fail``: failed
while fal rendered it).

So the holder marks the job held (:class:`~jobs.models.HeldSubmission`) the moment the record
is refused, and renews the mark every :data:`RENEW_SECONDS` while it holds it; every
reconciler leaves a job whose mark is fresh alone (:func:`jobs.store.held_job_ids`). Why a mark
of its own, not the job's lease renewed (as a long download does): the write refused may be
exactly that row's (a trigger on it, a corrupt page), and a renewal refused with it would let
the lease lapse. Why not judge by the holder's heartbeat: not every holder beats (a worker's
prefork child runs submits, its parent beats), and a live process that stalled past a submit's
lease must still have that submit settled — only a process that *says* it holds a job's answer
may keep it from the others.

When the holder is gone its mark is renewed no more: after :data:`STALE_SECONDS` it holds
nothing, and the lease rules apply to its job as before (:func:`worker.steps.reconcile.reconcile`).
Meanwhile the next process on its host records its journal (the entry is adopted, and marked
by that process if still refused). If none ever runs there again, the job is not stranded for
ever: it is settled as any submit whose answer was lost (a webhook proof, the policy; a late
answer is still adopted, :mod:`worker.steps.late_answers`).

The same keeper tries this process's held submissions again, every
:data:`~worker.steps.unrecorded.REFUSED_RETRY_SECONDS`, when its reconciler does not (a
distributed worker that does not lead runs none, nor does a prefork child): a mark renewed by a
holder that never tried again would hold its job until the process ends.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping

from sqlalchemy import Engine

from jobs import db, store
from jobs.db import HEARTBEAT_STALE_SECONDS
from jobs.models import utcnow
from jobs.processes import process_prefix
from worker.steps.unrecorded import Accepted, Unrecorded

log = logging.getLogger(__name__)

#: How often a holder renews its marks (as often as a process beats).
RENEW_SECONDS = 10.0
#: A mark not renewed for this long is a holder's that is gone: it holds nothing (as a heartbeat
#: this old says its process stopped).
STALE_SECONDS = HEARTBEAT_STALE_SECONDS
#: How long without a round of this process's reconciler before the keeper tries the held
#: submissions again itself.
RECONCILER_QUIET_SECONDS = 3 * RENEW_SECONDS


class HeldMarks:
    """This process's marks of the jobs it holds (module docstring). Every method may be called
    from any thread; none raises for the database (a mark that could not be written is tried
    again at the next renewal)."""

    def __init__(
        self, engine: Engine, unrecorded: Unrecorded, retry: Callable[[], object] | None = None
    ) -> None:
        self._engine = engine
        self._unrecorded = unrecorded
        #: Tries this process's held submissions again (:func:`worker.steps.reconcile.retry_held`,
        #: set by :func:`worker.runtime.build_runtime`); None: never here.
        self.retry = retry
        self._owner = process_prefix()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        #: Job ids marked by this keeper (deleted once no longer held).
        self._marked: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        #: The thread trying the held submissions again, while it runs (:meth:`_retry_aside`).
        self._retrier: threading.Thread | None = None
        #: When (``time.monotonic()``) the renewals began: the reconciler's quiet is counted from
        #: then (a process that reconciles tries its submissions at its own pace).
        self._started = 0.0
        self._closed = False
        unrecorded.marks = self

    # ------------------------------------------------------------------ Marks

    def hold(self, accepted: Accepted) -> None:
        """The database refused to record ``accepted``: its job is marked held now, before the
        step (or the reconciler) that met the refusal goes on, and renewed from then on."""
        held = {accepted.job_id: accepted.request_id, **self._unrecorded.marked()}
        self._write(held, gone={})
        self.wake()

    def wake(self) -> None:
        """Something is held: the renewals run (a thread, until nothing is held; a new one marks
        at once, a running one at its next renewal)."""
        with self._lock:
            if self._closed or self._thread is not None:
                return
            self._started = time.monotonic()
            self._thread = threading.Thread(
                target=_renew, args=(weakref.ref(self),), name="wanbatch-held-marks", daemon=True
            )
            self._thread.start()

    def release(self, held: Mapping[str, str]) -> None:
        """Those submissions are recorded: their marks go (whoever wrote them)."""
        try:
            with db.session_scope(self._engine) as session:
                store.release_held(session, held)
        except Exception as exc:  # left to go stale, or deleted at the next renewal
            log.debug(
                "could not clear held marks (%s)",
                db.database_problem(exc),
                extra={"event": "held.clear_failed"},
            )
            return
        with self._lock:
            for job_id, request_id in held.items():
                if self._marked.get(job_id) == request_id:
                    del self._marked[job_id]

    # ------------------------------------------------------------------ renewing

    def beat(self) -> bool:
        """One renewal: marks what is held now, clears what this keeper marked and holds no
        more, and tries the held submissions again when this process's reconciler does not.
        Whether anything is still held (or marked: the thread goes on)."""
        held = self._unrecorded.marked()
        with self._lock:
            gone = {j: r for j, r in self._marked.items() if held.get(j) != r}
        if held or gone:
            self._write(held, gone)
        if held and self.retry is not None and self._reconciler_quiet():
            self._retry_aside(self.retry)
        with self._lock:
            return self._holding()

    def close(self) -> None:
        """Renew nothing any more (the runtime ends): the marks go stale by themselves, while
        the next process on this host takes the journal over."""
        with self._lock:
            self._closed = True
            self._wake.notify_all()

    def _write(self, held: dict[str, str], gone: Mapping[str, str]) -> None:
        try:
            with db.session_scope(self._engine) as session:
                store.hold_submissions(session, self._owner, held, now=utcnow())
                store.release_held(session, gone)
        except Exception as exc:  # an outage, the same refusal: tried again at the next renewal
            log.debug(
                "could not mark %d held submission(s) (%s); tried again in %gs",
                len(held),
                db.database_problem(exc),
                RENEW_SECONDS,
                extra={"event": "held.mark_failed"},
            )
            return
        with self._lock:
            for job_id in gone:
                self._marked.pop(job_id, None)
            self._marked.update(held)

    def _reconciler_quiet(self) -> bool:
        since = max(self._unrecorded.reconciled_at, self._started)
        return time.monotonic() - since > RECONCILER_QUIET_SECONDS

    def _retry_aside(self, retry: Callable[[], object]) -> None:
        """Try the held submissions again on a thread of its own, one at a time: a retry that
        waits (a row lock, a slow fal call for a late answer) must not hold back the renewals,
        or the marks of a live holder would go stale and another process take its jobs."""
        with self._lock:
            if self._closed or (self._retrier is not None and self._retrier.is_alive()):
                return
            self._retrier = threading.Thread(
                target=self._try_again, args=(retry,), name="wanbatch-held-retry", daemon=True
            )
            self._retrier.start()

    def _try_again(self, retry: Callable[[], object]) -> None:
        try:
            retry()
        except Exception as exc:  # an outage, a schema this process cannot work on: next time
            log.debug(
                "could not try the held submissions again (%s)",
                db.database_problem(exc),
                extra={"event": "held.retry_failed"},
            )

    def _next(self) -> bool:
        """Wait for the next renewal; False once closed."""
        with self._lock:
            if not self._closed:
                self._wake.wait(RENEW_SECONDS)
            if self._closed:
                self._thread = None
                return False
            return True

    def _holding(self) -> bool:
        return bool(self._unrecorded.marked() or self._marked)

    def _round(self) -> bool:
        """One round of the thread; False when it ends (decided under the lock that
        :meth:`wake` takes, so that a submission held meanwhile starts a new one)."""
        try:
            self.beat()
        except Exception:  # a bug: said, and the thread lives on
            log.exception("renewing the held marks failed", extra={"event": "held.renew_failed"})
        with self._lock:
            if self._closed or not self._holding():
                self._thread = None
                return False
            return True


def _renew(ref: weakref.ReferenceType[HeldMarks]) -> None:
    """The keeper's thread: renews until nothing is held, the keeper is closed, or its runtime
    is gone (a weak reference: the thread never keeps a finished runtime alive)."""
    while True:
        keeper = ref()
        if keeper is None or not keeper._round() or not keeper._next():
            return
        del keeper
