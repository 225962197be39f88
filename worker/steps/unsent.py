"""Sends this process knows never went out, though the database still says they may have.

A submit records its send before the POST (``store.record_send``: from then on a process that
dies leaves a job whose outcome is unknown). When the POST then fails inside this process
before a byte went out (:class:`~worker.fal.errors.SubmitNotSentError`: fal unreachable, a
socket that could not be opened), or the job goes back before it (a stale rate grant, a window
about to close), the step gives the job back as never sent. Should that write fail too — the
database unreachable for a moment, this process out of file descriptors (``EMFILE``) — the job
stayed "its POST may be out" until its lease lapsed, and the reconciler then declared its
outcome unknown: by the default policy it failed ``submit_unknown``, "possibly billed", and
``rerun --failed-only`` was the only way on, for a request fal never saw.

So does a submit whose send's record failed as it committed (:func:`worker.steps.submit`'s
``_record_send``): a reply the database never sent, a log that could not be synced to disk. The
record may have landed, though the step saw it fail and made no POST.

The step notes such a send here (its job and the ``sent_at`` it recorded). The give-back once
the database answers again (:class:`worker.step_outage.GiveBack`), the stopping run's own
(:func:`worker.running`), and the reconciler of this process, finding the job's lease lapsed
with that very send recorded (:func:`worker.steps.reconcile.reconcile`), each give it back as
never sent instead (:func:`jobs.store.release_step_jobs`). Another process, or this one after a
restart, knows nothing of it: the job is then treated as before (the policy applies).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime

from jobs.clock import naive_utc
from jobs.store import ProvenUnsentSend


class ProvenUnsent:
    """The sends of this process proven not to have gone out whose give-back was not recorded,
    by job id. Thread-safe: submit steps note, the give-backs and the reconciler take."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sends: dict[str, ProvenUnsentSend] = {}

    def note(self, job_id: str, sent_at: datetime, why: str) -> None:
        """The job's send recorded at ``sent_at`` never went out (``why``), and saying so failed."""
        with self._lock:
            self._sends[job_id] = ProvenUnsentSend(naive_utc(sent_at), why)

    def proof(self, job_id: str, sent_at: datetime | None) -> ProvenUnsentSend | None:
        """The note of the job's send recorded at ``sent_at``, if this process made one; None
        for any other send of the job (a later one, another process's)."""
        with self._lock:
            found = self._sends.get(job_id)
        if found is None or sent_at is None or found.sent_at != naive_utc(sent_at):
            return None
        return found

    def noted(self, job_ids: Iterable[str] | None = None) -> dict[str, ProvenUnsentSend]:
        """The notes of ``job_ids`` (of every job when None), for a give-back to match against
        the sends the database holds (:func:`jobs.store.release_step_jobs`)."""
        with self._lock:
            if job_ids is None:
                return dict(self._sends)
            return {job_id: self._sends[job_id] for job_id in job_ids if job_id in self._sends}

    def forget(self, job_id: str) -> None:
        """The job was given back (or moved on): its note is no longer needed."""
        with self._lock:
            self._sends.pop(job_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sends)
