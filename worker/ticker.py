"""The periodic tick of the distributed deployment, run by exactly one worker at a time.

Every ``wanbatch worker`` process runs a :class:`Ticker` thread, but only the one holding the
leader lock ticks (reconcile, poll, dispatch, schedule downloads). On PostgreSQL the lock is a
session-level advisory lock held on a dedicated connection: when the leader dies (even by
``kill -9``) its connection closes, the server releases the lock, and another worker's ticker
takes over within one interval — no TTL to tune, no clock to trust. On SQLite (one host by
definition) every ticker leads.

Ticking in one place is also what makes the outstanding cap and the budget checks global
across workers and hosts (each is checked in the claim's transaction); the submit *rate* is
enforced right before each POST by the shared limiter of :mod:`worker.limits`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from jobs.db import AdvisoryLock, database_problem, is_unavailable
from jobs.errors import SchemaBehindError
from worker import steps

if TYPE_CHECKING:
    from worker.conductor import Conductor

log = logging.getLogger(__name__)

#: An arbitrary, fixed 64-bit key for ``pg_try_advisory_lock``: "wanbatch" in ASCII.
LEADER_LOCK_KEY = 0x77616E6261746368
#: How long a stopping worker waits for its ticker to finish the round it is in (and to clear
#: its heartbeat, give up the leader lock); past that the worker clears the heartbeat itself.
STOP_WAIT_SECONDS = 10.0


class LeaderLock:
    """Holds (or tries to take) the cluster-wide tick leadership."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = AdvisoryLock(engine, LEADER_LOCK_KEY)
        self._unavailable = False  # the last try met an unavailable database (said once)

    def acquire(self) -> bool:
        """True while this process is the leader; re-tries after a lost connection."""
        if self.engine.dialect.name != "postgresql":
            return True
        led = self._lock.held
        try:
            leads = self._lock.acquire()
        except Exception as exc:  # we are not the leader until the lock can be taken again
            self._lock.release(unlock=False)
            self._failed(exc, led)
            return False
        self._unavailable = False
        if leads and not led:
            log.info("this worker now leads the periodic tick", extra={"event": "tick.leading"})
        return leads

    def _failed(self, exc: Exception, led: bool) -> None:
        """Say why the lock could not be taken or checked: a database that is unavailable (a
        killed connection, a restart, a failover) is expected, so it is one warning line per
        outage without a traceback (what the driver said, then debug lines while it lasts);
        anything else is a bug and keeps its traceback. Either way the next tick tries again."""
        if not is_unavailable(exc):
            log.exception(
                "the leader lock failed; not leading the periodic tick, will retry",
                extra={"event": "tick.lock_failed"},
            )
            return
        if self._unavailable:
            log.debug("leader lock: the database is still unavailable (%s)", database_problem(exc))
            return
        self._unavailable = True
        log.warning(
            "leader lock connection lost: the database is unavailable (%s); %s until it answers, will retry",
            database_problem(exc),
            "this worker stops leading the periodic tick" if led else "not leading the periodic tick",
            extra={"event": "tick.lock_lost"},
        )

    @property
    def held(self) -> bool:
        """Whether this process led at the last :meth:`acquire` (no database round trip)."""
        return self.engine.dialect.name != "postgresql" or self._lock.held

    def release(self) -> None:
        """Give up leadership (closing the connection releases the advisory lock)."""
        self._lock.release()


def stop_this_worker() -> None:
    """Ask this worker process to stop as SIGTERM does (Celery's warm shutdown: the running
    tasks end first); ``wanbatch worker`` then exits with :attr:`Ticker.failure`."""
    os.kill(os.getpid(), signal.SIGTERM)


class Ticker(threading.Thread):
    """Conducts (:class:`~worker.conductor.Conductor`) while this process leads.

    The leader reacts to events — status streams it follows, notices other workers and the
    webhook receiver send over the database, and, from tasks running in its own process (a
    threads pool), direct calls (:func:`worker.tasks.conduct_here`) — and ticks every interval
    as the safety net; a process that does not lead only asks for the lock each interval.
    """

    def __init__(self, runtime_factory: Callable[[], steps.Runtime], interval: float) -> None:
        super().__init__(name="wanbatch-ticker", daemon=True)
        self.runtime_factory = runtime_factory
        self.interval = interval
        self.stopping = threading.Event()
        self._conductor: Conductor | None = None
        #: Why the conductor stopped for good (a schema downgraded under it); the worker then
        #: stops and exits 2 with it (``wanbatch worker``).
        self.failure: SchemaBehindError | None = None

    def run(self) -> None:
        from worker import tasks
        from worker.conductor import Conductor, listening

        rt = self.runtime_factory()
        lock = LeaderLock(rt.engine)
        conductor = self._conductor = Conductor(rt)
        if self.stopping.is_set():  # stopped while starting: shutdown() may have missed it
            conductor.close()
        tasks.conduct_here(conductor, lambda: lock.held)
        try:
            with listening(rt.engine, conductor.notify):
                conductor.run(self.stopping, leads=lock.acquire, resilient=True)
        except SchemaBehindError as exc:  # every round would fail: the worker stops, exit 2
            self.failure = exc
            log.warning("%s; this worker stops", exc, extra={"event": "conductor.schema_behind"})
            stop_this_worker()
        finally:
            tasks.conduct_here(None)
            conductor.close()
            lock.release()

    def stop(self) -> None:
        """Ask the thread to finish after its current round."""
        self.stopping.set()
        conductor = self._conductor
        if conductor is not None:
            conductor.wake()  # it may be waiting for an event up to an idle tick's interval

    def shutdown(self, timeout: float = STOP_WAIT_SECONDS) -> None:
        """Stop, wait up to ``timeout`` for the thread to end, and make sure this process's
        heartbeat is gone either way: a worker that stops cleanly (Celery's warm shutdown on
        SIGTERM or SIGINT) must not look, to ``status``, like one still working — nor, a minute
        later, like one that crashed. The thread is a daemon: without this wait, the process
        exited while it was still between two rounds, and its heartbeat stayed behind. Safe to
        call more than once."""
        self.stop()
        if self.is_alive():
            self.join(timeout)
        conductor = self._conductor
        if conductor is not None:
            conductor.close()  # done already when the thread ended; else now, from this thread
