"""How long ``wanbatch cancel`` keeps asking fal to cancel a request it will not cancel.

A cancel fal fails to take (a redirect its protocol cannot produce, a refusal, a gateway's 5xx,
the network) used to be tried again at every tick, for ever: ``cancel`` then never ended. Each
request's cancel is now tried at most :data:`CANCEL_ATTEMPTS` times by a process — a transient
failure (HTTP 408/409/429, a gateway 5xx, the network: :class:`~jobs.errors.RetryableProviderError`)
after the submit's backoff (``WANBATCH_RETRY_BASE_DELAY`` doubling, capped by
``WANBATCH_RETRY_MAX_DELAY``, or fal's ``Retry-After``), any other failure at the next tick — and
then given up. A request given up is left where fal holds it: its job stays ``queued`` (or
``running``), never ``cancelling`` or ``cancelled``, since fal may still run and bill it; it is
still followed, and downloaded should fal finish it. A run of the batch ends once nothing but
such requests is left (:attr:`worker.running.RunStats.uncancelled` names them), and a new process
(the next ``wanbatch cancel``) tries them again. A process that lives on (a worker, ``serve``'s
tick) tries a given-up cancel once more every :data:`GIVEN_UP_RETRY_SECONDS`: a fal outage longer
than the tries must not leave a cancelled batch's requests to run and be billed until a restart.

The tries are counted in memory, per process (as :attr:`~worker.steps.context.Runtime.download_crashes`):
a count that starts over only means a few more tries, never a payment. A give-up is also put on
the job's history (:func:`jobs.store.note_cancel_given_up`), so that once the process has ended
``status`` still names the requests fal may run and bill though their batch is cancelled (its
``uncancelled``), until a later cancel reaches fal or fal ends the request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Failed cancels of one request before this process gives it up: as many as the status answers
#: fal's protocol cannot produce that a job gets (:data:`worker.steps.poll.PROTOCOL_ERROR_LIMIT`).
CANCEL_ATTEMPTS = 5
#: How long after giving a request's cancel up a process that lives on tries it once more (and
#: again this long after each further failure): an embedded ``cancel`` has ended by then.
GIVEN_UP_RETRY_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class GivenUp:
    """A request whose cancel this process gave up: the job, its request, the last failure
    (key-free: fal's errors are scrubbed by the client) and how many tries were made."""

    job_id: str
    request_id: str
    error: str
    tries: int


@dataclass(slots=True)
class _Tries:
    request_id: str
    count: int
    due: float


class CancelTries:
    """The failed cancels of one process, per job (its request id: a new request starts over)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._tries: dict[str, _Tries] = {}
        self._given_up: dict[str, GivenUp] = {}
        self._given_up_due: dict[str, float] = {}  # job id -> when its given-up cancel is tried again

    def due(self, job_id: str, request_id: str) -> bool:
        """Whether the cancel of ``request_id`` (``job_id``'s) is to be sent now: its backoff after
        a transient failure over, or, given up, :data:`GIVEN_UP_RETRY_SECONDS` past."""
        with self._lock:
            given_up = self._given_up.get(job_id)
            if given_up is not None and given_up.request_id == request_id:
                return self._clock() >= self._given_up_due[job_id]
            tries = self._tries.get(job_id)
            return tries is None or tries.request_id != request_id or self._clock() >= tries.due

    def gave_up(self, job_id: str, request_id: str) -> bool:
        """Whether this process gave the cancel of ``request_id`` (``job_id``'s) up."""
        with self._lock:
            given_up = self._given_up.get(job_id)
            return given_up is not None and given_up.request_id == request_id

    def failed(
        self, job_id: str, request_id: str, error: str, *, wait: Callable[[int], float] | None = None
    ) -> GivenUp | None:
        """Count a failed cancel of ``request_id``; its next try is due ``wait(count)`` seconds
        later (``count``: its failed tries so far), or at once without ``wait``. The
        :class:`GivenUp` when that was the last try (:data:`CANCEL_ATTEMPTS`), else None."""
        with self._lock:
            earlier = self._given_up.get(job_id)
            if earlier is not None and earlier.request_id == request_id:
                # Tried once more after giving up, and failed again: next time, later still.
                self._given_up_due[job_id] = self._clock() + GIVEN_UP_RETRY_SECONDS
                return None
            tries = self._tries.get(job_id)
            count = 1 if tries is None or tries.request_id != request_id else tries.count + 1
            if count < CANCEL_ATTEMPTS:
                delay = wait(count) if wait is not None else 0.0
                self._tries[job_id] = _Tries(request_id, count, self._clock() + delay)
                return None
            self._tries.pop(job_id, None)
            given_up = GivenUp(job_id, request_id, error, count)
            self._given_up[job_id] = given_up
            self._given_up_due[job_id] = self._clock() + GIVEN_UP_RETRY_SECONDS
            return given_up

    def done(self, job_id: str) -> None:
        """fal took the cancel (or answered for the request): nothing more to count."""
        with self._lock:
            self._tries.pop(job_id, None)
            self._given_up.pop(job_id, None)
            self._given_up_due.pop(job_id, None)

    def given_up(self) -> list[GivenUp]:
        """Every request this process gave up cancelling, oldest first."""
        with self._lock:
            return list(self._given_up.values())
