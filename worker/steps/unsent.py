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

The step notes such a send here (its job and the ``sent_at`` it recorded); the reconciler of
this process, finding the job's lease lapsed with that very send recorded, gives it back as
never sent instead (:func:`worker.steps.reconcile.reconcile`). Another process, or this one
after a restart, knows nothing of it: the job is then treated as before (the policy applies).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class UnsentSend:
    """One send proven not to have gone out: when it was recorded, and why it did not go."""

    sent_at: datetime
    why: str


class ProvenUnsent:
    """The sends of this process proven not to have gone out whose give-back was not recorded,
    by job id. Thread-safe: submit steps note, the reconciler takes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sends: dict[str, UnsentSend] = {}

    def note(self, job_id: str, sent_at: datetime, why: str) -> None:
        """The job's send recorded at ``sent_at`` never went out (``why``), and saying so failed."""
        with self._lock:
            self._sends[job_id] = UnsentSend(_naive(sent_at), why)

    def proof(self, job_id: str, sent_at: datetime | None) -> UnsentSend | None:
        """The note of the job's send recorded at ``sent_at``, if this process made one; None
        for any other send of the job (a later one, another process's)."""
        with self._lock:
            found = self._sends.get(job_id)
        if found is None or sent_at is None or found.sent_at != _naive(sent_at):
            return None
        return found

    def forget(self, job_id: str) -> None:
        """The job was given back (or moved on): its note is no longer needed."""
        with self._lock:
            self._sends.pop(job_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sends)


def _naive(moment: datetime) -> datetime:
    """``moment`` in UTC without a zone: the same instant whether a database hands it back
    aware (PostgreSQL) or naive in UTC (SQLite)."""
    return moment if moment.tzinfo is None else moment.astimezone(UTC).replace(tzinfo=None)
