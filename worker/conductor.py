"""The conductor: react to what happens at fal the moment it happens; tick only as a safety net.

A batch drains at fal's pace only when a finished request is noticed at once and the next
job is sent at once: every second a slot idles after a completion is lost for good. So the
conductor (the one process that dispatches: an embedded ``run``, or the distributed tick
leader) waits on *events* —

* a status stream says a request started or ended (:mod:`worker.watcher`);
* a submit task says fal accepted a job (start watching it) or gave a slot back;
* another process says so over the database (``LISTEN``, :mod:`worker.notifications`): a
  worker's submit, the webhook receiver's delivery —

and on each one applies the status (the poller's compare-and-set moves), queues the download
and dispatches the next jobs right away. The periodic tick (reconcile, poll, dispatch,
downloads, stored webhooks) still runs every ``WANBATCH_TICK_INTERVAL``: whatever an event
missed — a dropped stream, a lost notice, a crashed worker — it finds, so events only ever
make things faster, never make them correct.

With a receiver configured (``WANBATCH_WEBHOOK_URL``) nothing is streamed: fal's webhooks tell
of completions, and polling is only the late safety net.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine

from jobs import db, open_files, store
from jobs.errors import SchemaBehindError
from jobs.listing import PROCESSING_STALE_SECONDS
from jobs.models import EVERY_BATCH, WORKER_SCOPE, JobView, utcnow
from jobs.processes import process_prefix
from worker import steps
from worker.broker_outage import BrokerOutage, broker_problem, broker_refusal
from worker.db_outage import DatabaseOutage
from worker.fal.models import RequestHandle, Status
from worker.limits import publish_limits, republish_through, resign_limits, unpublish_limits, watch_limits
from worker.peers import announce_settings, announcer_for, withdraw_settings
from worker.steps import peer_limits, shared_pacing
from worker.steps.context import Reach, Runtime, handle_of
from worker.steps.dispatch import forget_holds
from worker.steps.poll import AT_FAL, Seen, apply_seen, apply_seen_in
from worker.watcher import StatusWatcher

log = logging.getLogger(__name__)

#: How many status streams one conductor keeps open at most; requests beyond are polled.
MAX_STREAMS = 64
#: A job whose stream broke this many times is left to polling for the rest of its run.
STREAM_FAILURES_MAX = 3
#: Shortest pause between two dispatch rounds while jobs wait for the submit rate; the next
#: round comes when the rate has a token again (``RateBucket.until_next``), at the earliest this.
REDISPATCH_SECONDS = 0.02
#: While the download backlog holds submits back, how often dispatch looks again. A download
#: finished in this process says so at once (``notify("downloaded")``); this covers those of
#: other processes (the distributed workers), which the database does not announce.
BACKLOG_RECHECK_SECONDS = 0.25
#: How often the conductor records that it still works on its batches (``status`` reads it:
#: a batch nobody works on gets no forecast; :data:`jobs.listing.PROCESSING_STALE_SECONDS`).
HEARTBEAT_SECONDS = 10.0
#: "Started running" is bookkeeping, not a reason to act: such events are applied together,
#: at most this long after the first of them (one transaction for several jobs).
STARTED_BATCH_SECONDS = 0.2

#: After a round the database ended to break a conflict (a deadlock with another process), how
#: long before the next: that process finishes its transaction meanwhile. Whatever the round did
#: not do, the next round or tick does (events it lost are found by the safety net's poll).
CONFLICT_PAUSE_SECONDS = 0.05
#: While the database's disk is full and a submit step of this process waits to record what
#: fal accepted, how often the conductor looks whether it still waits (it sends nothing meanwhile).
FULL_DISK_LOOK_SECONDS = 0.25

#: Ticks in a row that found nothing to do before the tick slows down: a batch waiting for its
#: window, or one whose every job waits out a long retry, needs no safety net every second.
QUIET_TICKS = 5
#: At most this many tick intervals between two quiet ticks (8 s with the default 1 s): how much
#: later than at once a batch's window opening, or a change another process made (``resume``,
#: a new batch for the workers), is noticed while nothing else happens.
IDLE_TICK_FACTOR = 8
#: Calm ticks in a row (:meth:`Conductor._tick`: nothing to do, though jobs are at fal, because a
#: status stream follows every one of them) before the tick slows down while the jobs go on.
CALM_TICKS = 3
#: At most this many tick intervals between two calm ticks (4 s with the default 1 s).
CALM_TICK_FACTOR = 4


#: How a broker lost its queued messages (:func:`_how_lost`): a new ``run_id``.
RESTARTED = "it restarted"
#: ... or a new marker under the same ``run_id`` (:func:`worker.tasks.redis_epoch`).
FLUSHED = "flushed or evicted"


def _how_lost(known: str, epoch: str) -> str:
    """How the broker's incarnation ``known`` became ``epoch`` (``RUN_ID MARKER``, see
    :attr:`worker.steps.context.Runtime.broker_epoch`): :data:`RESTARTED` or :data:`FLUSHED`."""
    return RESTARTED if known.split(" ", 1)[0] != epoch.split(" ", 1)[0] else FLUSHED


def idle_interval(interval: float, quiet: int) -> float:
    """The time until the next tick after ``quiet`` ticks in a row found nothing to do.

    ``WANBATCH_TICK_INTERVAL`` as long as anything happens; after :data:`QUIET_TICKS` idle ones
    it doubles with each further one, up to :data:`IDLE_TICK_FACTOR` intervals. A batch waiting
    overnight for its window cost a tick of about 45 ms of CPU every second (5 % of a core); any
    event (a status, a submit, a freed slot) brings the interval back at once.
    """
    if quiet < QUIET_TICKS:
        return interval
    return interval * float(min(IDLE_TICK_FACTOR, 2 ** (quiet - QUIET_TICKS + 1)))


def calm_interval(interval: float, calm: int) -> float:
    """The time until the next tick after ``calm`` calm ticks in a row: ticks that found nothing
    to do while jobs were at fal, every one followed by a status stream, with no webhook
    receiver whose deliveries only a tick applies (:meth:`Conductor._tick`).

    The streams bring every completion at once, and the round that applies it dispatches the
    next job: the tick is then only the safety net, and in a 400-job drain each of its 27
    ticks found nothing, at about 11 ms of CPU each (0.7 ms a job, a twentieth of the run's
    CPU). So after :data:`CALM_TICKS` calm ones it doubles with each further one, up to
    :data:`CALM_TICK_FACTOR` intervals; the first tick that finds anything to do (a poll, a
    reconcile, a dispatch, a stream given up on, a request no stream follows) brings it back
    to ``WANBATCH_TICK_INTERVAL``. What only a tick notices (another process's cancel, a lease a
    dead process left, a schedule's deadline) is then noticed up to that much later.
    """
    if calm < CALM_TICKS:
        return interval
    return interval * float(min(CALM_TICK_FACTOR, 2 ** (calm - CALM_TICKS + 1)))


@dataclass
class ConductorStats:
    """What the conductor did (benchmarks, logs)."""

    rounds: int = 0
    ticks: int = 0
    status_calls: int = 0
    streams: int = 0
    events: int = 0
    dispatched: int = 0
    #: Rounds and ticks that changed, or may have changed, what the database holds: statuses
    #: applied, jobs dispatched or sent, a tick that did anything (a counter that only grows).
    #: An embedded ``run``'s progress refresh reads the batch again when it grew, and otherwise
    #: only now and then (``worker.running.REFRESH_UNCHANGED_SECONDS``).
    changes: int = 0


def _streams_that_fit(rt: Runtime, wanted: int) -> int:
    """``wanted`` status streams, or fewer when this process's open-file limit leaves room for
    fewer beside its threads (:func:`jobs.open_files.streams_that_fit`), said then in one
    warning line with the fix. The requests beyond them are polled."""
    threads = rt.settings.embedded_concurrency
    fit = open_files.streams_that_fit(threads, simulator_here=rt.simulated)
    if fit is None or fit >= min(wanted, rt.settings.max_outstanding):
        return wanted
    log.warning(
        "the open-file limit (%s, `ulimit -n`) leaves room for %d fal status stream(s) beside %d "
        "worker thread(s), for up to %d request(s) at fal (WANBATCH_MAX_OUTSTANDING): the others "
        "are polled, which learns of their end later; %s",
        open_files.soft_limit(),
        fit,
        threads,
        rt.settings.max_outstanding,
        open_files.EMFILE_FIX,
        extra={"event": "watcher.streams_limited", "streams": fit},
    )
    return fit


class Conductor:
    """Dispatches on events for one runtime. Call :meth:`notify` from any thread; :meth:`run` in one."""

    def __init__(self, rt: Runtime, *, stream: bool | None = None, max_streams: int = MAX_STREAMS) -> None:
        self.rt = rt
        if stream is None:
            stream = not rt.settings.webhook_url  # with webhooks, fal tells us; streams would double it
        if stream:
            max_streams = _streams_that_fit(rt, max_streams)
            stream = max_streams > 0
        self.watcher = (
            StatusWatcher(rt.client, self._on_status, self._on_lost, max_streams=max_streams)
            if stream
            else None
        )
        self.stats = ConductorStats()
        self._cond = threading.Condition()
        self._ended: list[Seen] = []  # requests that ended: applied at once, then dispatch
        self._started: list[Seen] = []  # requests that started running: applied in bunches
        self._started_since = 0.0
        self._submitted: set[str] = set()
        self._wants_dispatch = False
        #: Jobs whose status stream broke fewer than :data:`STREAM_FAILURES_MAX` times, and how
        #: often: followed again (a new stream). Dropped once the job is no longer followed (its
        #: stream said it ended, it was let go, or it was not followed again), as the watcher drops
        #: a job's first time (:meth:`StatusWatcher.forget`): a long-lived worker keeps none for
        #: jobs long gone.
        self._stream_failures: dict[str, int] = {}
        #: Jobs whose streams broke :data:`STREAM_FAILURES_MAX` times: job id -> the request given
        #: up on, polled from then on (no stream is opened for it again). Dropped at the tick
        #: once that request no longer waits at fal (:meth:`_prune_given_up`): the job ended, or
        #: was sent again (a new request is followed anew).
        self._given_up: dict[str, str] = {}
        #: The last catch-up (:meth:`_open_streams` at a tick) found every request at fal followed
        #: by a stream, with room for more: nothing for a poll (:func:`calm_interval`).
        self._all_followed = False
        #: The last tick was calm (:func:`calm_interval`).
        self.calm = False
        self._reach: Reach | None = None  # the runtime's reach as of the last tick (_watch)
        self._broker_epoch: str | None = None  # the broker's epoch as last seen (_after_broker_restart)
        #: When (monotonic) a loss told by the broker's marker alone last handed jobs on (None:
        #: never): another within ``WANBATCH_LEASE_SECONDS`` only moves the known epoch on.
        self._flush_handed_at: float | None = None
        #: Monotonic seconds (replaced in tests).
        self.clock: Callable[[], float] = time.monotonic
        #: Called at every tick, after its work (an embedded run's CPU check: worker.one_cpu).
        self.on_tick: Callable[[], object] | None = None
        #: ``rt.budget_cancelled`` as :meth:`_redispatch_at` last saw it.
        self._budget_cancelled_seen = rt.budget_cancelled
        self._beat_lock = threading.Lock()
        #: Who this process's heartbeat rows say beat: its owner with the proof of its identity,
        #: by which ``status`` tells at once that a killed run has ended (processes.beat_owner).
        self._beat_owner = rt.beat_owner
        self._next_beat = 0.0  # monotonic; 0: never beat
        self._next_follower_beat = 0.0  # monotonic, while not leading (_follower_beat); 0: never
        #: Called right after each heartbeat of a worker that does not lead (its write went
        #: through, so the database answers): the distributed ticker watches the leader's beat
        #: there, and takes the lead from one that froze (:meth:`worker.ticker.LeaderLock.watch_leader`).
        self.after_follower_beat: Callable[[], None] | None = None
        self._next_watch = 0.0  # monotonic: when a process that does not lead reads the leader's limits
        #: A worker (no batch of its own) publishes its outcome-deciding settings beside the
        #: other workers' at each heartbeat, leader or not (:mod:`worker.peers`): when next.
        self._announcer = None if rt.batch_ids else announcer_for(rt.limiter, process_prefix())
        self._next_announce = 0.0
        self._closed = False
        #: The limiter found the leader's policy gone, or answered after an outage: publish again
        #: (after checking the leader lock), without waiting for the next beat.
        self._limits_due = False
        republish_through(rt.limiter, self._republish_limits)
        #: What a database outage has done to the loop so far (:meth:`run` sets it up).
        self._outage = DatabaseOutage("the conductor", patience=None, url=rt.settings.database_url)
        self._broker_outage = BrokerOutage(rt.settings.broker_url)
        #: Since when (wall clock) the broker could not be reached, as the heartbeat rows say
        #: (``status`` names the broker); None: it answers (:meth:`_broker_down`).
        self._broker_down_since: datetime | None = None
        #: The last broker failure was Redis refusing the write (out of memory, a read-only
        #: replica): it still answers ``INFO``, so only a hand-off that goes through ends that
        #: outage (:meth:`_handing_off`, then :meth:`_writes_again`).
        self._broker_refusing = False
        self._broker_took_write = False
        rt.enqueue_submit = self._handing_off(rt.enqueue_submit)
        rt.enqueue_download = self._handing_off(rt.enqueue_download)

    # ------------------------------------------------------------------ events (any thread)

    def notify(self, kind: str, job_id: str) -> None:
        """Something happened to ``job_id``: ``submitted`` (fal has it: watch it), ``freed``,
        ``done``, ``webhook`` (a slot or a job may be free: dispatch), or ``downloaded`` (it
        left the download backlog: dispatch if that backlog held the last round back)."""
        if kind == "downloaded" and not self.rt.downloads_held:
            return  # the common case: nothing waits on downloads, so nothing to wake for
        if kind == "submitted" and self.watcher is not None and self.watcher.follows(job_id):
            return  # followed already (watch_accepted, in this process): a round would find nothing to do
        with self._cond:
            if kind == "submitted":
                self._submitted.add(job_id)
            else:
                self._wants_dispatch = True
            self._cond.notify()

    def wake(self) -> None:
        """End the wait for an event now (the run's ``stopping`` was set): the loop looks again."""
        with self._cond:
            self._cond.notify()

    def watch_accepted(self, job_id: str, handle: RequestHandle, batch_id: str | None = None) -> None:
        """fal accepted ``job_id`` (of ``batch_id``) as ``handle`` (the submit step, in this
        process): follow it now."""
        if self.watcher is not None and self.watcher.watch(job_id, handle, batch_id):
            self.stats.streams += 1

    def _republish_limits(self) -> None:
        """The limiter asks for the leader's limits to be published again (any thread)."""
        with self._cond:
            self._limits_due = True
            self._cond.notify()

    def _on_status(self, job_id: str, request_id: str, status: Status) -> None:
        with self._cond:
            if status.completed:
                self._stream_failures.pop(job_id, None)  # ended: followed no more
                self._ended.append(Seen(job_id, request_id, status))
                self._wants_dispatch = True
                self._cond.notify()
            else:  # started running: worth recording, not worth a round of its own
                if not self._started:
                    self._started_since = time.monotonic()
                self._started.append(Seen(job_id, request_id, status))

    def _on_lost(self, job_id: str, request_id: str) -> None:
        """A stream broke: follow the request again (a new stream), a few times; then poll it."""
        with self._cond:
            failures = self._stream_failures.get(job_id, 0) + 1
            if failures < STREAM_FAILURES_MAX:
                self._stream_failures[job_id] = failures
                self._submitted.add(job_id)
            else:
                del self._stream_failures[job_id]
                self._given_up[job_id] = request_id
            self._cond.notify()
        if failures >= STREAM_FAILURES_MAX and self.watcher is not None:
            self.watcher.forget({job_id})  # polled from now on: followed no more

    def _pending(self) -> bool:
        started_due = bool(self._started) and time.monotonic() - self._started_since >= STARTED_BATCH_SECONDS
        return bool(self._ended or self._submitted or self._wants_dispatch or started_due or self._limits_due)

    def _take(self, timeout: float) -> tuple[list[Seen], set[str], bool]:
        """Wait up to ``timeout`` for something to do; then (statuses to apply, jobs to watch,
        whether to dispatch). "Started running" events wait up to :data:`STARTED_BATCH_SECONDS`
        to be applied together, or go along with the next round."""
        with self._cond:
            if not self._pending() and timeout > 0:
                if self._started:
                    timeout = min(
                        timeout, max(0.0, self._started_since + STARTED_BATCH_SECONDS - time.monotonic())
                    )
                self._cond.wait(timeout)
            # A round that only starts watching a submit writes nothing: the started events it
            # would take along would cost a transaction of their own. They wait for a round
            # that writes anyway (a completion, a dispatch), or until they are due.
            due = bool(self._started) and time.monotonic() - self._started_since >= STARTED_BATCH_SECONDS
            started = self._started if due or self._ended or self._wants_dispatch else []
            seen = started + self._ended
            submitted, wants = self._submitted, self._wants_dispatch
            if started:
                self._started = []
            self._ended, self._submitted, self._wants_dispatch = [], set(), False
        return seen, submitted, wants

    # ------------------------------------------------------------------ the loop (one thread)

    def run(
        self,
        stopping: threading.Event,
        *,
        on_progress: Callable[[], bool] | None = None,
        progress_every: float = 0.5,
        leads: Callable[[], bool] | None = None,
        resilient: bool = False,
    ) -> None:
        """React to events and tick until ``stopping`` is set or ``on_progress`` says done.

        ``on_progress`` is called at most every ``progress_every`` seconds (and returns True
        when the work is finished); ``leads`` is asked before each tick — a process that does
        not lead waits and asks again (the distributed tick leader lock). ``resilient``: an
        error in a round is logged and the next round goes on (a long-lived worker, whose next
        round re-reads everything); otherwise it ends the run (a ``wanbatch run`` reports it) —
        but for a transaction the database ended to break a conflict with another process's
        (:func:`jobs.db.is_transient_conflict`), which the next round simply does again, and for
        a database that is unavailable for a while (:func:`jobs.db.is_unavailable`: a killed
        connection, a restart, a failover), which rounds wait out (:class:`DatabaseOutage`: one
        warning, growing pauses). Not resilient, an outage longer than ``WANBATCH_LEASE_SECONDS``
        ends the run with :class:`~worker.db_outage.DatabaseUnavailableError` (by then the
        leases this process holds have run out, and nothing can be done without the database).
        Resilient, a broker that cannot be reached (:func:`worker.broker_outage.broker_problem`:
        kombu's ``OperationalError`` and the clients' connection errors) is an outage too
        (:class:`~worker.broker_outage.BrokerOutage`: one warning line, at most every 30 s, no
        traceback), and the next round goes on after a pause.

        A round that fails on a missing column or table of a schema older than this wanbatch's
        (:func:`jobs.db.schema_behind`: downgraded under this process) ends the loop, resilient
        or not, with :class:`~jobs.errors.SchemaBehindError` (one line): it logged a traceback
        about once a second and the batches stalled. So does every heartbeat that finds the
        schema's revision changed (:meth:`_schema_still_ours`, leading or not), and a step of
        this process that met it (``Runtime.schema_behind``).

        A database whose disk is full (:func:`jobs.db.is_disk_full`) stops every round — nothing
        more is claimed or sent — for as long as a submit step of this process waits to record
        a request fal accepted (:meth:`_hold_while_full`); then the round is tried again. With
        nothing waiting, a run ends with the error; a resilient worker waits for space.
        """
        settings = self.rt.settings
        self._outage = DatabaseOutage(
            "the run" if not resilient else "the conductor",
            patience=None if resilient else settings.lease_seconds,
            url=settings.database_url,
        )
        while not stopping.is_set():
            try:
                self._loop(stopping, on_progress, progress_every, leads)
                return
            except SchemaBehindError:  # a heartbeat's look, or a step of this process, found it
                raise
            except Exception as exc:
                if db.gave_up_on_lock(exc):  # stopping: the run's last line says the database is locked
                    return
                if db.is_transient_conflict(exc):  # another process's transaction was in the way
                    log.warning(
                        "conductor round met a database conflict (%s); going on",
                        type(getattr(exc, "orig", exc)).__name__,
                        extra={"event": "conductor.conflict"},
                    )
                    stopping.wait(CONFLICT_PAUSE_SECONDS)
                    continue
                # A column or table missing, on a schema older than this wanbatch's: an
                # ``alembic downgrade`` under this process. Every round would fail the same way
                # (SQLite's "no such column" looks like an outage): said in one line, and this
                # process works on that database no more (a run ends, a worker exits 2).
                if db.is_schema_mismatch(exc) and (behind := db.schema_behind(self.rt.engine)):
                    self._stop_for_schema(behind)
                if db.is_disk_full(exc):  # before is_unavailable, which a full disk also is
                    if self._hold_while_full(stopping, on_progress, progress_every, resilient):
                        continue
                    raise  # nothing waits to be recorded: the run ends, saying where to free space
                if db.is_unavailable(exc):  # gone for a while: no bug, and nothing is lost meanwhile
                    self._outage.failed(exc, stopping)  # raises once it lasted too long (not resilient)
                    continue
                if not resilient:
                    raise
                problem = broker_problem(exc)
                if problem is not None:  # the broker is down: an outage, as the database's, no bug
                    refusal = broker_refusal(exc)
                    self._broker_outage.failed(problem, refusal)
                    self._broker_refusing, self._broker_took_write = refusal is not None, False
                    self._broker_down(True)
                    stopping.wait(min(1.0, self.rt.settings.tick_interval))
                    continue
                log.exception(
                    "conductor round failed; going on after a pause", extra={"event": "conductor.failed"}
                )
                stopping.wait(min(1.0, self.rt.settings.tick_interval))

    def _hold_while_full(
        self,
        stopping: threading.Event,
        on_progress: Callable[[], bool] | None,
        progress_every: float,
        resilient: bool,
    ) -> bool:
        """A round failed because the database's disk is full: no round (no claim, no send)
        until no submit step of this process is under way any more — a step that holds a
        request id fal accepted waits until it is recorded, however long freeing space takes,
        and the progress line says so. True: try the round again; False: nothing was waiting,
        so a run ends with the error (``run`` says where to free space)."""
        waiting = self.rt.unrecorded
        new = waiting.mark_full()
        if resilient:  # a worker lives on: it waits for space, saying so now and then
            if new or waiting.reminder_due():
                log.warning(
                    "the database's disk is full: nothing is claimed or sent until space is freed on %s",
                    waiting.place,
                    extra={"event": "conductor.database_full"},
                )
            stopping.wait(min(1.0, self.rt.settings.tick_interval))
            return True
        if not waiting.busy():
            return False
        next_progress = 0.0
        while waiting.busy() and not stopping.is_set():
            if on_progress is not None and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + progress_every
                on_progress()
            stopping.wait(FULL_DISK_LOOK_SECONDS)
        return True

    def _loop(
        self,
        stopping: threading.Event,
        on_progress: Callable[[], bool] | None,
        progress_every: float,
        leads: Callable[[], bool] | None,
    ) -> None:
        interval = self.rt.settings.tick_interval
        next_tick = next_progress = 0.0
        leading = False
        asked = 0.0  # monotonic: when ``leads`` was last asked
        quiet = 0  # ticks in a row that found nothing to do (see idle_interval)
        calm = 0  # ticks in a row that found nothing to do while streams follow the jobs (calm_interval)
        redispatch_at: float | None = None
        while not stopping.is_set():
            if self.rt.schema_behind is not None:  # a step of this process met it (a task's thread)
                self._stop_for_schema(self.rt.schema_behind)
            now = time.monotonic()
            if self._announcer is not None and now >= self._next_announce:
                self._next_announce = now + HEARTBEAT_SECONDS
                announce_settings(self._announcer)
            if now >= next_tick:
                leading, asked = (leads() if leads is not None else True), now
                if leading:
                    quiet = quiet + 1 if self._tick(stopping) else 0
                    calm = calm + 1 if self.calm else 0
                    self.rt.unrecorded.writable()  # the tick's writes worked: sending may go on
                    if redispatch_at is None:  # the tick's dispatch left jobs waiting: as a round would
                        redispatch_at = self._redispatch_at()
                if not leading:  # the lock is another's (or was lost): never publish meanwhile
                    resign_limits(self.rt.limiter)
                    peer_limits.let_go(self.rt)  # nor apply the strictest of the runs' limits
                    forget_holds(self.rt)  # nor say the end of a hold its rounds no longer see
                if not leading and now >= self._next_watch:
                    # Not leading: the leader's limits, when one first publishes or another takes
                    # over, are compared with this process's (said once) and kept (fail safe).
                    self._next_watch = now + HEARTBEAT_SECONDS
                    watch_limits(self.rt.limiter)
                    self._follower_beat()
                self._outage.answered()  # the tick (or the leader lock's check) reached the database
                self._broker_outage.answered()
                self._writes_again()
                if leading and self.rt.broker_epoch is None and not self._broker_refusing:
                    # Nothing asks the broker: a tick without a hand-off error is all there is to go by.
                    self._broker_down(False)
                quiet_gap = idle_interval(interval, quiet)
                gap = calm_interval(interval, calm) if quiet < QUIET_TICKS else quiet_gap
                next_tick = now + (gap if leading else interval)
            elif self._limits_due or (leading and self._next_beat and now >= self._next_beat):
                # Between ticks too: an idle tick comes only every 8 × WANBATCH_TICK_INTERVAL, and
                # a heartbeat older than a minute says nobody works on the batches; and at once
                # when the limiter found the published limits gone. The lock may have passed to
                # another worker since the tick: asked again, so that only the worker holding it
                # beats and publishes its limits.
                with self._cond:
                    republish, self._limits_due = self._limits_due, False
                if leading:
                    leading, asked = (leads() if leads is not None else True), now
                if not leading:
                    resign_limits(self.rt.limiter)
                    peer_limits.let_go(self.rt)
                    forget_holds(self.rt)
                elif self._next_beat and now >= self._next_beat:
                    self._beat()  # publishes too
                elif republish and not self.rt.batch_ids:
                    publish_limits(self.rt.limiter, process_prefix())
            if on_progress is not None and now >= next_progress:
                # Idle (nothing at fal, nothing to do), nothing changes between two ticks either.
                next_progress = now + max(
                    progress_every, idle_interval(interval, quiet) if quiet >= QUIET_TICKS else 0.0
                )
                if on_progress():
                    return
            deadline = min(next_tick, next_progress if on_progress is not None else next_tick)
            if leading and self._next_beat:
                deadline = min(deadline, self._next_beat)
            if redispatch_at is not None:
                deadline = min(deadline, redispatch_at)
            if self._announcer is not None:
                deadline = min(deadline, self._next_announce)
            seen, submitted, wants_dispatch = self._take(max(0.0, deadline - time.monotonic()))
            if leading and leads is not None and time.monotonic() - asked >= interval:
                # Fencing: a round after a pause (this process frozen while it waited, even for
                # minutes) first checks the lead is still its own; another worker may have
                # taken it over meanwhile (worker.ticker.LeaderWatch). At most one check per
                # interval: the tick's own covers busy times.
                leading, asked = leads(), time.monotonic()
            if stopping.is_set() or not leading:
                if submitted:  # not followed again here: the leader's catch-up finds them
                    self._not_followed(submitted)
                continue
            self.stats.rounds += 1
            self.stats.events += len(seen)
            if quiet and (seen or submitted or wants_dispatch):  # something happens: tick as usual
                quiet = 0
                next_tick = min(next_tick, time.monotonic() + interval)
                next_progress = min(next_progress, time.monotonic() + progress_every)
            due_again = redispatch_at is not None and time.monotonic() >= redispatch_at
            dispatching = wants_dispatch or due_again
            if seen and dispatching:
                sent = self._apply_then_dispatch(seen)
            else:
                apply_seen(self.rt, seen)
                sent = steps.dispatch(self.rt) if dispatching else []
            if submitted:
                self._watch(submitted)
            if seen or sent or submitted:
                self.stats.changes += 1
            self._writes_again()
            if dispatching:
                self.stats.dispatched += len(sent)
                if quiet and self.rt.budget_cancelled > self._budget_cancelled_seen:
                    # A budget ended jobs: a batch is being wound down, no idle time
                    quiet = 0
                    next_tick = min(next_tick, time.monotonic() + interval)
                    next_progress = min(next_progress, time.monotonic() + progress_every)
                # Jobs left waiting for the submit rate (or for downloads elsewhere to finish),
                # or a batch a budget is winding down: look again shortly, not at the next tick.
                redispatch_at = self._redispatch_at()

    def _redispatch_at(self) -> float | None:
        """When to dispatch again after a round that left jobs waiting, without an event: when the
        submit rate has a token again (a 429's pause included), or shortly while the download
        backlog holds them (downloads that end in other processes announce nothing). None when
        no job was left waiting.

        Also shortly after rounds that cancelled jobs for a budget cap (since the last call):
        those jobs were work done, nothing sent, and a batch's jobs that still wait there (left
        to their claim: :func:`worker.steps.dispatch._end_what_cannot_fit`) are decided round
        after round, not one round per idle tick (eight tick intervals)."""
        wound_down = self.rt.budget_cancelled > self._budget_cancelled_seen
        self._budget_cancelled_seen = self.rt.budget_cancelled
        bucket = self.rt.bucket
        if bucket is not None and bucket.short:
            return time.monotonic() + max(REDISPATCH_SECONDS, bucket.until_next())
        if wound_down:
            return time.monotonic() + REDISPATCH_SECONDS
        if self.rt.downloads_held:
            return time.monotonic() + BACKLOG_RECHECK_SECONDS
        return None

    def _apply_then_dispatch(self, seen: list[Seen]) -> list[str]:
        """Statuses and the dispatch of the slots they freed, in one transaction: a completion
        costs one commit instead of two (and the dispatch counts the jobs that just completed).
        A failed dispatch must not take the statuses with it — each was heard once — so they
        are then applied on their own before the error goes on."""
        try:
            with db.session_scope(self.rt.engine) as session:
                applied = apply_seen_in(session, self.rt, seen)
                dispatched = steps.dispatch_in(session, self.rt)
        except Exception:
            apply_seen(self.rt, seen)
            raise
        applied.hand_on(self.rt)
        sent = dispatched.hand_on(self.rt)
        if dispatched.unverified:  # jobs wait for the twin's output just read: decide them now
            sent = sent + steps.dispatch(self.rt)
        return sent

    def _tick(self, stopping: threading.Event) -> bool:
        """The safety net: a full tick, polling what no stream follows, and what a stream has
        followed for ``WANBATCH_POLL_MAX_INTERVAL`` without saying it ended (every such interval:
        an open stream is no proof that it ever will); then let go of the streams of requests a
        poll found ended, and catch up on requests at fal that nothing watches (sent by another
        process, or a previous run).

        True when it found nothing to do: nothing at fal or to download, nothing applied,
        reconciled, polled, sent or scheduled, no stream open (see :func:`idle_interval`)."""
        self.stats.ticks += 1
        self._beat()
        self._after_broker_restart()
        young: frozenset[str] = frozenset()
        old: frozenset[str] = frozenset()
        if self.watcher is not None:
            young, old = self.watcher.by_age(self.rt.settings.poll_max_interval)
        was_idle = self.rt.nothing_in_flight
        self.rt.nothing_in_flight = False  # the tick's dispatch says otherwise, if it runs
        with self.rt.reach_once():  # the simulations' batches read once a tick (Runtime.reach_once)
            report = steps.tick(self.rt, stopping, exclude=young, streamed=old)
            self.stats.status_calls += report.status_calls
            self.stats.dispatched += report.dispatched
            if old:
                self._let_go_of_ended(old)
            self._prune_given_up()
            self._all_followed = False
            if self.watcher is not None and not stopping.is_set():
                self._watch(set())
        did = (
            report.webhooks
            + report.reconciled
            + report.status_calls
            + report.dispatched
            + report.budget_cancelled
            + report.downloads
        )
        if did or self.rt.nothing_in_flight != was_idle:
            self.stats.changes += 1
        if self.on_tick is not None:
            self.on_tick()
        streams = self.watcher.watching() if self.watcher is not None else frozenset()
        with self._cond:
            polled = bool(self._given_up)  # requests whose streams broke for good: polled at ticks
        # Calm (calm_interval): nothing to do, the jobs at fal all followed by streams, none left
        # to polls, and no webhook receiver (on SQLite only a tick applies its deliveries).
        self.calm = (
            did == 0
            and bool(streams)
            and self._all_followed
            and not polled
            and self.rt.settings.webhook_url is None
        )
        return did == 0 and self.rt.nothing_in_flight and not streams

    def _let_go_of_ended(self, job_ids: frozenset[str]) -> None:
        """Stop the streams among ``job_ids`` whose request no longer waits at fal (a poll, a
        webhook or another process found it ended, or the job moved on): a stream that never
        says so would hold its thread, its room and its connection for good."""
        watcher = self.watcher
        if watcher is None:
            return
        followed = watcher.requests(job_ids)
        if not followed:
            return
        ended = self._no_longer_at_fal(followed)
        if ended:
            log.debug(
                "%d status stream(s) let go: their requests ended without the stream saying so",
                len(ended),
                extra={"event": "stream.let_go"},
            )
            watcher.let_go(ended)
            with self._cond:
                for job_id in ended:
                    self._stream_failures.pop(job_id, None)

    def _no_longer_at_fal(self, requests: dict[str, str]) -> list[str]:
        """The jobs of ``requests`` (job id -> request id) whose request no longer waits at fal:
        the job ended or left fal, or was sent again as another request."""
        with db.read_scope(self.rt.engine) as session:
            heads = store.job_heads(session, requests)
        return [
            job_id
            for job_id, request_id in requests.items()
            if (head := heads.get(job_id)) is None
            or head.state not in AT_FAL
            or head.request_id != request_id
        ]

    def _prune_given_up(self) -> None:
        """Drop the jobs given up on (:attr:`_given_up`) whose request no longer waits at fal:
        ended, or sent again as a new request. Those left are at fal, and only they are kept out
        of the catch-up (:meth:`_open_streams`): neither grows with the jobs a long-lived worker
        ever lost a stream for. One short read per tick, only while some are given up."""
        with self._cond:
            given_up = dict(self._given_up)
        if not given_up:
            return
        gone = self._no_longer_at_fal(given_up)
        with self._cond:
            for job_id in gone:
                if self._given_up.get(job_id) == given_up[job_id]:
                    del self._given_up[job_id]

    def _after_broker_restart(self) -> None:
        """When the broker came back as a new incarnation (a Redis restarted with nothing on
        disk, or flushed, or its keys evicted), hand the jobs whose messages it lost on again, at
        once, instead of after their leases run out."""
        if self.rt.broker_epoch is None:
            return
        try:
            epoch = self.rt.broker_epoch()
        except Exception as exc:
            if broker_problem(exc) is None:
                raise
            # Down: said on the heartbeat (``status`` names the broker) even while nothing is
            # handed on — an idle leader otherwise learnt it only from the next hand-off. The
            # tick goes on: fal is polled and the database written all the same.
            self._broker_down(True)
            return
        if epoch is None:  # cannot tell (refusing writes): look again at the next tick
            return
        if not self._broker_refusing:  # a Redis refusing writes answers INFO: see _handed_off
            self._broker_down(False)  # it answered: an outage the heartbeat records is over
        known, self._broker_epoch = self._broker_epoch, epoch
        if known is None or known == epoch:
            return
        self._hand_on_lost(_how_lost(known, epoch))

    def _hand_on_lost(self, how: str) -> None:
        """The broker lost its queued messages (``how``: "it restarted", "flushed or evicted"):
        hand the jobs handed to tasks not started yet on again, and say so once.

        A loss told by the marker alone (:data:`FLUSHED`) hands on at most once per
        ``WANBATCH_LEASE_SECONDS``: under a ``maxmemory-policy`` that evicts keys the marker, read
        once a tick, is the coldest key and can go nearly every tick while the queue survives,
        and each hand-on would add a copy of every waiting job's message and a note on its
        history. Within that time a job whose message was lost all the same is recovered when
        its lease runs out. A restart (:data:`RESTARTED`, a new ``run_id``) always hands on."""
        now = self.clock()
        if how == FLUSHED:
            last = self._flush_handed_at
            if last is not None and now - last < self.rt.settings.lease_seconds:
                log.debug(
                    "the broker's marker was lost again %.0f s after the last hand-on (flushed or "
                    "evicted): not handing on again within WANBATCH_LEASE_SECONDS (%.0f s); leases "
                    "running out recover any job whose message was lost",
                    now - last,
                    self.rt.settings.lease_seconds,
                    extra={"event": "conductor.broker_flushed_again"},
                )
                return
            self._flush_handed_at = now
        submits, downloads = steps.hand_on_again(self.rt, how)
        if how == RESTARTED:
            what = "the broker restarted (its queued messages may be lost)"
        else:
            what = (
                "the broker lost its queued messages (flushed or evicted; `wanbatch doctor` says "
                "whether its maxmemory-policy evicts keys)"
            )
        log.warning(
            "%s: handed %d submit(s) and %d download(s) on again",
            what,
            submits,
            downloads,
            extra={"event": "conductor.broker_restarted" if how == RESTARTED else "conductor.broker_flushed"},
        )

    def _watch(self, job_ids: set[str]) -> None:
        """Follow ``job_ids`` (just submitted, or their stream was lost) and any other unwatched
        request at fal, room permitting. Those of ``job_ids`` not followed now are forgotten by
        the watcher (:meth:`StatusWatcher.forget`): a later stream of theirs is a first one."""
        watcher = self.watcher
        if watcher is None:
            return
        taken: set[str] = set()
        try:
            self._open_streams(watcher, job_ids, taken)
        finally:
            if job_ids - taken:
                self._not_followed(job_ids - taken)

    def _not_followed(self, job_ids: set[str]) -> None:
        """``job_ids`` (lost streams or submits) are not followed now: the watcher forgets their
        first time (:meth:`StatusWatcher.forget`), and their lost streams are no longer counted.
        Those followed now (another stream of theirs is open) are left as they are."""
        watcher = self.watcher
        if watcher is None:
            return
        watcher.forget(job_ids)
        with self._cond:
            for job_id in job_ids:
                if job_id in self._stream_failures and not watcher.follows(job_id):
                    del self._stream_failures[job_id]

    def _open_streams(self, watcher: StatusWatcher, job_ids: set[str], taken: set[str]) -> None:
        """:meth:`_watch`'s streams; the jobs whose stream it opened are added to ``taken``."""
        if watcher.room() <= 0:
            return
        with self._cond:
            given_up = dict(self._given_up)
        watching = watcher.watching()
        # The catch-up leaves out the requests given up on (still at fal: _prune_given_up); a
        # job named in ``job_ids`` is left out only while its request is the one given up on.
        exclude = watching if job_ids else watching | given_up.keys()
        if job_ids and not job_ids - exclude:
            return  # already followed (watch_accepted): nothing to read
        with db.read_scope(self.rt.engine) as session:
            # Never another provider's requests: on PostgreSQL a `--simulate` run and the workers
            # hear of each other's submits too. Read each tick (the catch-up below), and kept for
            # the submits heard in between: a simulation started since costs a futile stream at most.
            reach = self._reach if job_ids and self._reach is not None else self.rt.reach(session)
            self._reach = reach
            jobs: Sequence[JobView]
            if job_ids:
                found = store.job_snapshots(session, job_ids - exclude).values()  # rows, not objects
                jobs = [
                    j
                    for j in found
                    if j.state in AT_FAL and reach.holds(j) and given_up.get(j.id, "") != j.request_id
                ]
            else:
                jobs = store.requests_at_fal(
                    session,
                    states=AT_FAL,
                    exclude_ids=exclude,
                    limit=watcher.room(),
                    batch_ids=reach.batch_ids,
                    exclude_batch_ids=reach.exclude_batch_ids,
                    sent_to=reach.sent_to,
                )
                self._all_followed = not jobs  # with room to spare: every request at fal is followed
            handles = [
                (j.id, handle_of(j, self.rt.settings.fal_queue_url), j.batch_id)
                for j in jobs
                if j.request_id is not None
            ]
        for job_id, handle, batch_id in handles:
            if watcher.watch(job_id, handle, batch_id):
                taken.add(job_id)
                self.stats.streams += 1

    def _beat(self) -> None:
        """Record, every :data:`HEARTBEAT_SECONDS`, that this process works on its batches (an
        embedded run's own, or every batch for the distributed workers' leader)."""
        with self._beat_lock:
            now = time.monotonic()
            if self._closed or now < self._next_beat:
                return
            self._next_beat = now + HEARTBEAT_SECONDS
            scopes = self.rt.batch_ids or frozenset({EVERY_BATCH})
            at = utcnow()
            # The workers' leader takes over from any every-batch beat gone stale (a crashed
            # worker's): its own clean stop then leaves no "last seen" behind.
            stale = at - timedelta(seconds=PROCESSING_STALE_SECONDS)
            with db.session_scope(self.rt.engine) as session:
                store.record_heartbeat(
                    session,
                    self._beat_owner,
                    scopes,
                    at,
                    supersede_before=stale,
                    broker_down_since=self._broker_down_since,
                    limits=peer_limits.published_by(self.rt),
                )
                # Another live process on the database and no limiter Redis: POSTs take their
                # slots from the database (one short query per beat, none per submit).
                shared_pacing.note_peers(session, self.rt)
                # The account's limits: the strictest of the live dispatching processes' (one
                # short query per beat).
                peer_limits.note_limits(session, self.rt)
            self._schema_still_ours()
            if not self.rt.batch_ids:  # the workers' leader: its limits hold for every worker
                publish_limits(self.rt.limiter, process_prefix())

    def _follower_beat(self) -> None:
        """A worker that does not lead records, every :data:`HEARTBEAT_SECONDS` (no more: it is
        called at most that often, with the leader's limits watched), that it still works on this
        database (:data:`~jobs.models.WORKER_SCOPE`): an upgrade of the schema by a newer
        wanbatch refused naming the leader only, and once that one was stopped, named the next.
        A failed write is a failed round, as the leader's beat is (:meth:`run`)."""
        with self._beat_lock:
            now = time.monotonic()
            if self._closed or self.rt.batch_ids or now < self._next_follower_beat:
                return
            self._next_follower_beat = now + HEARTBEAT_SECONDS
            with db.session_scope(self.rt.engine) as session:
                store.record_heartbeat(session, self._beat_owner, [WORKER_SCOPE], utcnow())
            self._schema_still_ours()
        if self.after_follower_beat is not None:
            self.after_follower_beat()

    def _schema_still_ours(self) -> None:
        """At every heartbeat, leading or not: stop (:meth:`_stop_for_schema`) once the database's
        schema is no longer this wanbatch's (``alembic downgrade`` under this process). The
        rounds meet a missing column only where they read one, and a worker that does not lead
        runs none: it went on taking submit and download tasks on the older schema until it
        took the lead. One small query (:func:`jobs.db.revision_behind`)."""
        behind = db.revision_behind(self.rt.engine)
        if behind is not None:
            self._stop_for_schema(behind)

    def _stop_for_schema(self, behind: str) -> None:
        """The database's schema is older than this wanbatch's (``behind`` says so): every step
        of this process leaves its job as it is from now on (``Runtime.schema_behind``), and
        the loop ends with :class:`~jobs.errors.SchemaBehindError` (one line; a worker exits 2)."""
        self.rt.schema_behind = behind
        raise SchemaBehindError(f"{behind}: {db.SCHEMA_BEHIND_FIX}") from None

    def _handing_off(self, send: Callable[[str], None]) -> Callable[[str], None]:
        """``send`` (a hand-off to the broker), noting that the broker took a write while it
        was said to refuse them; the loop then ends that outage (:meth:`_writes_again`), not
        the hand-off itself, which may run inside a transaction, or on a task's thread."""

        def handed_off(job_id: str) -> None:
            send(job_id)
            if self._broker_refusing:  # the usual case costs one attribute read
                self._broker_took_write = True

        return handed_off

    def _writes_again(self) -> None:
        """After a tick or a round: a hand-off went through since the broker refused writes (out
        of memory, a read-only replica), so it takes them again and that outage is over."""
        if not self._broker_took_write:
            return
        self._broker_took_write = self._broker_refusing = False
        self._broker_down(False)

    def _broker_down(self, down: bool) -> None:
        """The broker could not be reached (``down``), or answered: when that changes, say so on
        this process's heartbeat rows at once (:func:`jobs.store.mark_broker_down`), for
        ``status`` to name the broker instead of blaming what the outage holds back. Best
        effort: a database that cannot be written now gets it at the next beat."""
        if down == (self._broker_down_since is not None):
            return
        since = utcnow() if down else None
        with self._beat_lock:
            self._broker_down_since = since
            if self._closed or self._next_beat == 0:
                return  # no row (yet, or any more): the first beat carries it
            try:
                with db.session_scope(self.rt.engine) as session:
                    store.mark_broker_down(session, self._beat_owner, since)
            except Exception as exc:
                log.debug(
                    "could not record the broker's state (%s); the next beat does",
                    db.database_problem(exc),
                    extra={"event": "conductor.broker_state_unrecorded"},
                )

    def close(self) -> None:
        """Stop reporting stream events (the streams end when the client closes), and say that
        this process no longer works on its batches (nor holds its submits because fal cannot be
        reached: :meth:`~worker.steps.fal_reach.FalReach.release`). Safe to call more than once,
        from any thread."""
        if self.watcher is not None:
            self.watcher.close()
        self.rt.fal_reach.release()  # a hold on fal this process recorded ends with it
        withdraw_settings(self._announcer)  # its settings go with it: no later warning names it
        with self._beat_lock:
            if self._closed or (self._next_beat == 0 and self._next_follower_beat == 0):
                self._closed = True
                return  # cleared already, or never beat: nothing to clear
            self._closed = True
            if not self.rt.batch_ids:  # the workers' leader: its published limits go with it
                unpublish_limits(self.rt.limiter)
            try:
                with db.session_scope(self.rt.engine) as session:
                    store.drop_heartbeats(session, self._beat_owner)
            except Exception as exc:  # the database is gone: the rows go stale instead
                # Said already: the run ends with where to free space, that another process
                # holds the database's lock (a stopping run does not wait for it), or that the
                # database is read-only (its heartbeat was never stored then).
                if db.is_disk_full(exc) or db.gave_up_on_lock(exc) or db.is_read_only(exc):
                    log.debug(
                        "heartbeat left to go stale (%s)",
                        db.database_problem(exc),
                        extra={"event": "conductor.heartbeat_left"},
                    )
                    return
                log.warning(
                    "could not clear this process's heartbeat (%s); it goes stale by itself",
                    db.database_problem(exc),  # one line: what the database said
                    extra={"event": "conductor.heartbeat_left"},
                )


@contextlib.contextmanager
def listening(engine: Engine, notify: Callable[[str, str], None]) -> Iterator[None]:
    """While inside, notices other processes send over the database reach ``notify``.

    PostgreSQL only (``LISTEN``, :mod:`worker.notifications`): a worker's submit, the webhook
    receiver's delivery. Elsewhere (SQLite: one host) the tick finds their effects instead.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    from worker.notifications import EventListener

    listener = EventListener(engine.url.render_as_string(hide_password=False))
    stop = threading.Event()

    def relay() -> None:
        while not stop.is_set():
            for payload in listener.wait(1.0):
                kind, _, job_id = payload.partition(":")
                notify(kind, job_id)

    thread = threading.Thread(target=relay, name="wanbatch-listen", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(2.0)
        listener.close()
