"""Requests sent with another API key that this process's key cannot ask about.

fal keeps a request for the account that sent it: a key of the same account may ask about it
(status, stream, result, cancel), a key of another account is told it does not exist (404) or
is refused. So a job whose request was sent with another key (``Job.api_key_id``: a ``FAL_KEY``
rotated between two runs of a batch) is asked about as any other, and:

* when fal answers it (a status, a stream's event, a result), the request is this key's from
  then on (:meth:`~worker.steps.context.Runtime.followed_with_this_key`,
  :func:`jobs.store.followed_with_key`): same account, followed, and no longer said to wait
  for another key;
* when fal says "not found" (or refuses it), nothing is concluded — the request may still run
  and bill at the other account — and the job keeps its request; this process notes it here
  (:class:`OtherKeys`), per job and request, and the first time in the database too
  (:meth:`~worker.steps.context.Runtime.key_refused`, :func:`jobs.store.note_key_refused`),
  where every process reads it: said in a warning that first time, at debug level after. A run
  ends once nothing but such requests is left (exit 2, :func:`worker.running._watch`, which
  reads them from the database: a run watching distributed workers too), naming the key id and
  the ways out: a run with that key, or ``wanbatch cancel BATCH --abandon-other-key`` (which asks
  fal about each first: :mod:`worker.abandon`). A cancel fal answers "not found" for such a
  request is not a cancel (nothing was cancelled): noted the same way, and asked again only
  every :data:`CANCEL_AGAIN_SECONDS` by a process that lives on (a worker).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from worker.stranded import Stranded

#: How long after fal answered "not found" to a cancel of another key's request a process that
#: lives on (a worker, ``serve``'s tick) asks again (as a given-up cancel:
#: :data:`worker.steps.cancel_tries.GIVEN_UP_RETRY_SECONDS`).
CANCEL_AGAIN_SECONDS = 300.0


class OtherKeys:
    """The requests of other keys fal would not answer this process about, per job."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._stranded: dict[str, Stranded] = {}
        self._cancel_due: dict[str, float] = {}  # job id -> when a cancel is sent again

    def refused(self, job_id: str, request_id: str, key_id: str) -> None:
        """fal told this key "not found" (or refused it) about ``job_id``'s ``request_id``."""
        with self._lock:
            self._stranded[job_id] = Stranded(job_id, request_id, key_id)

    def noted(self, job_id: str, request_id: str) -> bool:
        """Whether fal's refusal of ``job_id``'s ``request_id`` is noted here already."""
        with self._lock:
            found = self._stranded.get(job_id)
            return found is not None and found.request_id == request_id

    def cancel_noted(self, job_id: str, request_id: str) -> bool:
        """Whether fal's "not found" to a cancel of ``job_id``'s ``request_id`` is noted here already."""
        with self._lock:
            found = self._stranded.get(job_id)
            return found is not None and found.request_id == request_id and job_id in self._cancel_due

    def cancel_refused(self, job_id: str, request_id: str, key_id: str) -> None:
        """fal answered "not found" to this key's cancel of ``request_id``: noted as
        :meth:`refused`, and not asked to cancel again for :data:`CANCEL_AGAIN_SECONDS`."""
        with self._lock:
            self._stranded[job_id] = Stranded(job_id, request_id, key_id)
            self._cancel_due[job_id] = self._clock() + CANCEL_AGAIN_SECONDS

    def cancel_due(self, job_id: str, request_id: str) -> bool:
        """Whether a cancel of ``job_id``'s ``request_id`` is to be sent now."""
        with self._lock:
            found = self._stranded.get(job_id)
            if found is None or found.request_id != request_id:
                return True
            return self._clock() >= self._cancel_due.get(job_id, 0.0)

    def answered(self, job_id: str) -> None:
        """fal answered about the job's request with this key (or the job moved on)."""
        with self._lock:
            self._stranded.pop(job_id, None)
            self._cancel_due.pop(job_id, None)

    def stranded(self) -> list[Stranded]:
        """Every request noted, oldest first."""
        with self._lock:
            return list(self._stranded.values())
