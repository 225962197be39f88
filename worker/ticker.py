"""The periodic tick of the distributed deployment, run by exactly one worker at a time.

Every ``wanbatch worker`` process runs a :class:`Ticker` thread, but only the one holding the
leader lock ticks (reconcile, poll, dispatch, schedule downloads). On PostgreSQL the lock is a
session-level advisory lock held on a dedicated connection: when the leader dies (even by
``kill -9``) its connection closes, the server releases the lock, and another worker's ticker
takes over within one interval — no TTL to tune, no clock to trust. On SQLite (one host by
definition) every ticker leads.

A leader that is *frozen* rather than dead — ``kill -STOP``, Ctrl-Z on a foreground worker, a
debugger, a paused VM or laptop — keeps its connection, and the lock: its kernel still answers
TCP keepalives. The other workers watch its heartbeat (:class:`LeaderWatch`): silent for
:func:`leader_silent_after`, the first to notice ends the lock's session on the server
(``pg_terminate_backend``) and takes the lock. The frozen leader, once it wakes, finds its lock
connection gone at its next check (every tick, and before any round after a pause: the
conductor's fencing) and steps down; what it did in between is fenced by the store's
compare-and-set transitions (:mod:`jobs.store`), so no job is sent twice.

Ticking in one place is also what makes the outstanding cap and the budget checks global
across workers and hosts (each is checked in the claim's transaction); the submit *rate* is
enforced right before each POST by the shared limiter of :mod:`worker.limits`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine

from jobs import db, store
from jobs.db import AdvisoryLock, database_problem, is_unavailable
from jobs.errors import SchemaBehindError
from jobs.processes import owner_prefix
from worker import steps

if TYPE_CHECKING:
    from worker.conductor import Conductor

log = logging.getLogger(__name__)

#: An arbitrary, fixed 64-bit key for ``pg_try_advisory_lock``: "wanbatch" in ASCII.
LEADER_LOCK_KEY = 0x77616E6261746368
#: How long a stopping worker waits for its ticker to finish the round it is in (and to clear
#: its heartbeat, give up the leader lock); past that the worker clears the heartbeat itself.
STOP_WAIT_SECONDS = 10.0

#: A tick leader whose heartbeat has not moved for this many of its beats is taken for frozen.
#: One missed beat is a slow round; three in a row is a process that does not run at all.
LEADER_SILENT_BEATS = 3
#: Added to the beats' time: the follower reads the leader's beat only at its own beats (every
#: ``HEARTBEAT_SECONDS`` too), so a live leader's beat may look that much older than it is.
LEADER_SILENT_MARGIN_SECONDS = 5.0
#: Never sooner than this: ending a live leader's session (one whose rounds were merely slow)
#: costs a hand-over, and a frozen one costs little more for these few seconds.
LEADER_SILENT_MIN_SECONDS = 30.0
#: After ending a frozen leader's session, how long a follower waits for the server to free the
#: lock (the backend exits a moment after it is signalled) before leaving it to its next tick.
TAKEOVER_WAIT_SECONDS = 2.0


def leader_silent_after(tick_interval: float, beat_every: float) -> float:
    """How long a tick leader's heartbeat may stay the same before the other workers take it
    for frozen and take the lead over: :data:`LEADER_SILENT_BEATS` of its beats (or ticks, when
    those are slower), plus :data:`LEADER_SILENT_MARGIN_SECONDS`, at least
    :data:`LEADER_SILENT_MIN_SECONDS` — 35 s with the defaults (a beat every 10 s)."""
    beats = LEADER_SILENT_BEATS * max(tick_interval, beat_every) + LEADER_SILENT_MARGIN_SECONDS
    return max(LEADER_SILENT_MIN_SECONDS, beats)


class LeaderWatch:
    """Whether the tick leader has stopped beating, by this process's own monotonic clock.

    What is watched is the pair (the session holding the lock, the leader's latest beat): the
    leader is silent once that pair has not changed for ``silent_after`` seconds. Counting by
    the watcher's own clock, not by comparing the beat's time with now, leaves the hosts'
    clocks out of it (a skewed host would otherwise end a live leader, or never a frozen one);
    a new holder (another worker took over) starts the count again."""

    def __init__(self, silent_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.silent_after = silent_after
        self.clock = clock
        self._seen: tuple[int, datetime | None] | None = None
        self._since = 0.0

    def silent_for(self, holder: int | None, beat: datetime | None) -> float | None:
        """Note what was just read: ``holder`` (the lock's backend pid; None: free) and the
        leader's latest ``beat``. How long (s) both have stayed the same when that reaches
        ``silent_after``; None otherwise (or while nobody holds the lock)."""
        now = self.clock()
        if holder is None:
            self._seen = None
            return None
        if self._seen != (holder, beat):
            self._seen, self._since = (holder, beat), now
            return None
        quiet = now - self._since
        return quiet if quiet >= self.silent_after else None

    def forget(self) -> None:
        """Start over (this process took the lead, or the holder was just ended)."""
        self._seen = None


class LeaderLock:
    """Holds (or tries to take) the cluster-wide tick leadership."""

    def __init__(self, engine: Engine, *, silent_after: float = LEADER_SILENT_MIN_SECONDS) -> None:
        self.engine = engine
        self._lock = AdvisoryLock(engine, LEADER_LOCK_KEY)
        self._unavailable = False  # the last try met an unavailable database (said once)
        self._watch = LeaderWatch(silent_after)
        #: The frozen holder this role was refused to end (said once per holder).
        self._refused: int | None = None

    def acquire(self) -> bool:
        """True while this process is the leader; re-tries after a lost connection.

        Leading, this checks that the lock's own session is still alive (one ``SELECT 1`` on it):
        after this process was frozen, another worker may have ended that session and taken the
        lock (:meth:`watch_leader`). Then this process steps down at once — saying so, not
        "the database is unavailable" — and a fresh try finds the lock another's."""
        if self.engine.dialect.name != "postgresql":
            return True
        led = self._lock.held
        try:
            leads = self._lock.acquire()
        except Exception as exc:  # we are not the leader until the lock can be taken again
            self._lock.release(unlock=False)
            if led and is_unavailable(exc) and self._taken_over():
                return False
            self._failed(exc, led)
            return False
        self._unavailable = False
        if leads and not led:
            self._watch.forget()
            log.info("this worker now leads the periodic tick", extra={"event": "tick.leading"})
        return leads

    def _taken_over(self) -> bool:
        """The lock's session just failed while leading: whether another session holds the lock
        now (this process was frozen and another worker took over), said in one warning. False
        when the database cannot be asked either (an outage: :meth:`_failed` says so)."""
        try:
            holder = db.advisory_lock_holder(self.engine, LEADER_LOCK_KEY)
        except Exception:
            return False
        if holder is None:
            return False
        log.warning(
            "this worker lost the leader lock: its session was ended and another worker (database "
            "backend pid %d) leads the periodic tick now, likely because this process was frozen "
            "(stopped, paused) for a while; stepping down",
            holder,
            extra={"event": "tick.stepped_down"},
        )
        return True

    def watch_leader(self) -> None:
        """Called by a worker that does not lead, right after its own heartbeat was written (the
        database answers it): when the leader's heartbeat has stayed the same, under the same
        lock holder, for the watch's ``silent_after`` (:class:`LeaderWatch`), end that holder's
        session (:func:`jobs.db.terminate_advisory_holder`) and take the lock. A frozen
        process's kernel still answers TCP keepalives, so nothing else ever frees it.

        A role that may not end that session (PostgreSQL: another role's, or a superuser's)
        says so once per holder and goes on as before: the leader resumes, or its connection
        ends some other way. Any failure here is the next watch's to retry."""
        if self.engine.dialect.name != "postgresql" or self._lock.held:
            return
        try:
            self._watch_once()
        except Exception as exc:
            log.debug(
                "could not look at the tick leader (%s)",
                database_problem(exc),
                extra={"event": "tick.leader_unwatched"},
            )

    def _watch_once(self) -> None:
        holder = db.advisory_lock_holder(self.engine, LEADER_LOCK_KEY)
        with db.read_scope(self.engine) as session:
            beats = store.workers_beats(session)
        silent = self._watch.silent_for(holder, beats.leader_seen)
        if silent is None or holder is None:
            return
        owner = _who(beats.leader_owner)
        ended = db.terminate_advisory_holder(self.engine, LEADER_LOCK_KEY, holder)
        if ended is None:
            if self._refused != holder:
                self._refused = holder
                log.warning(
                    "the tick leader %s (database backend pid %d) has not beaten for %.0fs while "
                    "holding the leader lock, but this worker's database role may not end its "
                    "session (it needs the same role, membership in it, or pg_signal_backend and "
                    "pg_read_all_stats): "
                    "nothing is dispatched or collected until it resumes or its connection ends",
                    owner,
                    holder,
                    silent,
                    extra={"event": "tick.leader_frozen_untouchable"},
                )
            return
        self._watch.forget()
        if not ended:  # it let go meanwhile (or another worker ended it): nothing to do here
            return
        log.warning(
            "the tick leader %s (database backend pid %d) has not beaten for %.0fs while holding "
            "the leader lock (a frozen process: stopped, in a debugger, a paused VM): ended its "
            "lock session; this worker takes over the periodic tick",
            owner,
            holder,
            silent,
            extra={"event": "tick.leader_frozen"},
        )
        # Frozen in the middle of a dispatch round, it holds that round's lock too (on another
        # connection): its successor's first round would wait for it for ever.
        if db.terminate_stuck_holder(self.engine, store.DISPATCH_LOCK_KEY, self._watch.silent_after):
            log.warning(
                "also ended the frozen leader's dispatch round, left open in its transaction",
                extra={"event": "tick.leader_frozen_round"},
            )
        deadline = time.monotonic() + TAKEOVER_WAIT_SECONDS
        while not self.acquire() and time.monotonic() < deadline:
            time.sleep(0.1)  # the backend exits a moment after the signal; else the next tick takes it

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


def _who(owner: str | None) -> str:
    """A heartbeat owner as a log line names it: ``host:pid`` (its proof of identity left out)."""
    if owner is None:
        return "(a worker that has not beaten yet)"
    prefix = owner_prefix(owner)
    return prefix.rstrip(":") if prefix is not None else owner


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
        from worker.conductor import HEARTBEAT_SECONDS, Conductor, listening

        rt = self.runtime_factory()
        lock = LeaderLock(rt.engine, silent_after=leader_silent_after(self.interval, HEARTBEAT_SECONDS))
        conductor = self._conductor = Conductor(rt)
        conductor.after_follower_beat = lock.watch_leader
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
