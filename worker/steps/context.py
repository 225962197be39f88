"""What every step runs with: the runtime (database, fal client, settings, limits), the
worker's identity for leases, and how a stored job becomes a request handle again."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import db, processes, store
from jobs.listing import FAL_HOLD_STALE_SECONDS, FAL_PROBE_PAUSE_MAX
from jobs.models import EVERY_BATCH, BatchRecord, Job, JobRecord, JobView, utcnow
from jobs.processes import process_prefix
from jobs.schedule import Schedule
from jobs.settings import MAX_SECONDS, Settings
from jobs.states import JobState
from jobs.store import CapScope, Fence, batch_schedule, simulated_batch_ids
from worker import logs
from worker.fal.client import FalClient
from worker.fal.models import RequestHandle
from worker.fal.storage import MediaPreparer
from worker.here import queue_origin
from worker.limits import LocalGCRA, RedisGCRA, SubmitLimiter, api_key_id, limiter_for
from worker.outage_log import HoldLog
from worker.steps.cancel_tries import CancelTries
from worker.steps.dead_inputs import DeadInputs
from worker.steps.download_reach import DownloadReach, DownloadTrouble
from worker.steps.fal_reach import FalReach, Hold
from worker.steps.held import HeldMarks
from worker.steps.keepalive import StepLeases
from worker.steps.other_key import OtherKeys
from worker.steps.output_writes import OutputWrites
from worker.steps.unrecorded import Unrecorded
from worker.steps.unsent import ProvenUnsent

log = logging.getLogger(__name__)

S = JobState

#: Lease owner of a ``downloading`` job whose task is queued but not yet running: keeps the tick
#: from queueing it again until the lease expires (which is how a lost message is noticed).
DOWNLOAD_QUEUE = "download-queue"


def worker_identity() -> str:
    """``host:pid:thread``: who holds a lease, for the event log and for fencing."""
    return f"{process_prefix()}{threading.get_ident() % 100000}"


class RateBucket:
    """A token bucket that paces *dispatch* to the submit rate.

    It is not the limit itself: the POST happens later, in a task on any worker, so the hard
    limit is the shared GCRA taken right before each POST (:mod:`worker.limits`). This bucket,
    in the single tick leader, only keeps dispatch from claiming far more jobs than can be sent
    soon, so submit tasks rarely wait for a token and almost never give a job back. Every
    process's dispatch also takes its tokens from the bucket in the database
    (:func:`jobs.store.take_submit_tokens`), which holds the rate across processes that share no
    limiter (two embedded runs; one beside the workers); this one keeps the 429 pauses
    (:meth:`hold_off`) and what the next round waits for.
    """

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        #: Monotonic seconds (a test's own clock: the pauses it holds without waiting them out).
        self.clock = clock
        self.tokens = self.capacity
        self.stamp = clock()
        #: Whether the last :meth:`take` granted fewer tokens than wanted (jobs wait for the rate).
        self.short = False
        #: Until when (monotonic) the shared bucket of every dispatching process has no whole
        #: token (:meth:`shared_short`).
        self._shared_until = 0.0

    def set_rate(self, rate: float) -> None:
        """Refill at ``rate`` from now on (its capacity with it, a second's worth): another
        process's stricter submit rate now applies (:meth:`Runtime.apply_limits`), or no longer."""
        self._refill()
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = min(self.tokens, self.capacity)

    def _refill(self) -> None:
        """Add the tokens the time since the last refill brought (up to the capacity)."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, wanted: int) -> int:
        """Take up to ``wanted`` whole tokens; returns how many were granted."""
        self._refill()
        granted = max(0, min(wanted, int(self.tokens)))
        self.tokens -= granted
        self.short = granted < wanted
        return granted

    def shared_short(self, unused: int, wait: float) -> None:
        """The rate's bucket shared by every dispatching process (:func:`jobs.store.take_submit_tokens`)
        granted ``unused`` fewer than this one: give them back here, and look again in ``wait``
        seconds, when the shared bucket has a whole token."""
        self.tokens += unused
        self.short = True
        self._shared_until = self.clock() + wait

    def until_next(self) -> float:
        """Seconds until a whole token is there (0.0 when one is now): when dispatch, left short
        by the rate, should look again — not sooner, when nothing could be claimed anyway."""
        now = self.clock()
        missing = 1.0 - (self.tokens + (now - self.stamp) * self.rate)
        return max(0.0, missing / self.rate, self._shared_until - now)

    def hold_off(self, seconds: float) -> None:
        """Grant nothing for ``seconds`` (fal said 429, and the shared limiter holds every submit
        back as long): claiming jobs now would only hand them back. Unlocked, as :meth:`take`: a
        lost update costs a few claims the limiter gives back, never a submit it did not grant.

        The time since the last refill is counted first, so the hold starts now. Counted after
        (by the next :meth:`take`), the seconds between the previous round and this one were
        taken off the hold: a 5 s pause heard 10 s after the last round (an idle tick) held
        nothing, and that round claimed jobs only for their submits to give them back."""
        self._refill()
        self.tokens = min(self.tokens, -seconds * self.rate)


class SharedPacing:
    """Whether this process's POSTs take their slots from the database
    (:mod:`worker.steps.shared_pacing`): until when (monotonic) another live process was last
    known to share the database's pacing. Set at this process's heartbeat and by each dispatch
    round (which reads the key's row anyway); read by each submit, with no query."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until = 0.0

    def shared_for(self, seconds: float) -> None:
        """The database says the pacing is shared for ``seconds`` more (0: not, or no longer)."""
        self._until = self.clock() + seconds if seconds > 0 else 0.0

    @property
    def shared(self) -> bool:
        return self._until > self.clock()


@dataclass(frozen=True, slots=True)
class SubmitTicket:
    """What dispatch knew of a job it just marked ``submitting``: all the submit step reads.

    Handed over in-process only (an embedded run), so the submit starts without reading the
    job and its batch again. It is as safe as a read: everything the submit writes is fenced by
    ``fence``, so a job changed since (cancelled, say) makes its first write fail and nothing
    is sent.
    """

    fence: Fence
    endpoint: str
    input: dict[str, Any]
    attempt: int
    batch_id: str
    schedule: Schedule
    priority: str
    #: Each media field as validated, with its bytes' SHA-256 (``jobs.source_files``).
    source_files: dict[str, Any] | None = None
    #: The batch's manifest: a refused input file is named relative to its folder.
    manifest_path: str | None = None

    @classmethod
    def of(cls, fence: Fence, job: JobRecord, batch: BatchRecord, attempt: int) -> SubmitTicket:
        """The ticket of attempt ``attempt`` of ``job`` (``submitting``, held as ``fence``) of ``batch``."""
        return cls(
            fence=fence,
            endpoint=job.endpoint,
            input=dict(job.input),
            attempt=attempt,
            batch_id=job.batch_id,
            schedule=batch_schedule(batch),
            priority=batch.priority,
            source_files=job.source_files,
            manifest_path=batch.manifest_path,
        )


@dataclass(frozen=True)
class DownloadClaim:
    """What the download step read when it took the job's lease (or what the conductor of this
    process read when it leased the job for its download: :func:`handed_claim`)."""

    fence: Fence
    #: None for a rerun's job that took a staged video (``reused_from``): it has no request at fal.
    handle: RequestHandle | None
    output: dict[str, Any] | None
    item_index: int
    batch_id: str
    batch_name: str
    failures: int
    completed_at: datetime | None
    #: The job as claimed (detached; the lease keeps it from changing while this step runs).
    job: JobView
    #: fal's result fetched by this step and not stored yet: written with the step's outcome
    #: (the job's success, or the release or failure that ends this try), in the same transaction.
    fetched: dict[str, Any] = field(default_factory=dict)
    #: The batch this one was rerun from (``parent_batch_id``), else None: the sidecar's
    #: ``parent_batch``.
    parent_batch: str | None = None

    @property
    def version(self) -> int:
        """The fencing token this download holds (it tags the download's temporary files)."""
        return self.fence.version


@dataclass(frozen=True)
class Reach:
    """Which requests a runtime may touch (:meth:`Runtime.reach`): those of the batches of
    ``batch_ids`` (None: any) that are not in ``exclude_batch_ids``, sent to the fal queue at
    ``sent_to`` (None: any; a request whose origin was not recorded is anyone's). All three are
    :func:`jobs.store.claim_jobs`'s own filters, passed as they are."""

    batch_ids: frozenset[str] | None
    exclude_batch_ids: frozenset[str]
    sent_to: str | None = None

    def covers(self, batch_id: str) -> bool:
        """Whether the requests of ``batch_id`` are within reach (as a batch: each request's
        queue is :meth:`holds`'s to say)."""
        inside = self.batch_ids is None or batch_id in self.batch_ids
        return inside and batch_id not in self.exclude_batch_ids

    def holds(self, job: JobView | JobRecord) -> bool:
        """Whether the request of ``job`` is within reach: its batch is, and it went to this
        runtime's fal queue (or to one not recorded)."""
        if not self.covers(job.batch_id):
            return False
        sent_to = getattr(job, "fal_origin", None)
        return self.sent_to is None or sent_to is None or sent_to == self.sent_to


class LeaseReclaimer(Protocol):
    """Takes back the jobs of dead processes' leases (:class:`worker.steps.dead_leases.DeadLeases`)."""

    def take_back(self) -> int:
        """Let the leases of processes known to be gone lapse now; how many jobs came back."""
        ...

    def note(self, now: datetime | None = None) -> str:
        """What the progress line says about the leases still waited for ("" when none)."""
        ...

    def beside(self) -> str:
        """What the progress line says about the other processes working on the batch too."""
        ...


class StepsEnded:
    """How many steps (submits, downloads) of this process have ended, whatever their outcome:
    a counter that only grows, for an embedded ``run``'s progress refresh, which reads the
    database only when something may have changed since its last read. Counted under a lock:
    two steps ending at once must both count (a lost increment could leave the value the
    refresh saw last, and the batch's last download would not be noticed for seconds). Nobody
    is woken: the refresh reads the value at its next look (every 0.5 s)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> None:
        """A step ended."""
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        """The steps ended so far."""
        with self._lock:
            return self._count


@dataclass
class Runtime:
    """What a step needs: the database, the fal client, settings, and how to hand work on."""

    engine: Engine
    client: FalClient
    settings: Settings
    enqueue_submit: Callable[[str], None]
    enqueue_download: Callable[[str], None]
    media: MediaPreparer
    owner: str = field(default_factory=worker_identity)
    bucket: RateBucket | None = None
    limiter: SubmitLimiter | None = None
    #: The batches this runtime works on; None = every batch (a distributed worker serves all).
    #: An embedded ``run`` sets its own batch: it must never send, download or cancel the jobs of
    #: another batch that was only submitted (issue #9: a 3-job run spent $180 on someone
    #: else's 120k-job batch). Bookkeeping that keeps the *global* outstanding cap truthful —
    #: status checks of requests already at fal, recovering expired submit leases — still
    #: covers every batch of its provider (see :func:`worker.steps.poll.poll`,
    #: :func:`worker.steps.reconcile.reconcile` and :meth:`reach`).
    batch_ids: frozenset[str] | None = None
    #: This runtime's fal is a simulator (``run --simulate``, always scoped to its batch). What
    #: a simulator holds, fal does not, and the reverse: see :meth:`reach`.
    simulated: bool = False
    #: Tells whoever conducts this process that something happened to a job, the moment it
    #: happened: ``notify(kind, job_id)`` with kind ``submitted`` (fal has it: watch it),
    #: ``freed`` (it no longer holds an outstanding slot: dispatch now), ``done``, or
    #: ``downloaded`` (it left the download backlog: dispatch now if that backlog held it back). The tick
    #: remains the safety net, so a lost notice only costs latency. See :mod:`worker.conductor`.
    notify: Callable[[str, str], None] = field(default=lambda kind, job_id: None)
    #: A ``--simulate`` run's watch on other processes' leases of its batch: the reconciler has
    #: it take back a dead simulated run's at once (its simulator is gone with it), and the
    #: progress line says what it still waits for. None elsewhere.
    dead_leases: LeaseReclaimer | None = None
    #: Which incarnation of the message broker this is, or None when it cannot be told (a Redis
    #: refusing writes; None itself for another broker, or embedded; a Redis that does not answer
    #: raises its client's error: the broker is down): for Redis ``RUN_ID MARKER``, its ``run_id`` and
    #: the marker key of its database (:func:`worker.tasks.redis_epoch`). A new one lost the queued
    #: messages (a restart: a new ``run_id``; a flush or an eviction: a new marker alone): the tick
    #: leader hands the waiting jobs on again (:func:`worker.steps.reconcile.hand_on_again`).
    broker_epoch: Callable[[], str | None] | None = None
    #: Whether the last dispatch round sent fewer jobs than fal had room for because the
    #: download backlog (``WANBATCH_MAX_DOWNLOAD_BACKLOG``) was full: then a finished download
    #: (``notify("downloaded")``) is what frees the next submit, not a completion at fal.
    downloads_held: bool = False
    #: Whether the last dispatch round found a cap full: the outstanding cap (the account's, or
    #: an endpoint's) or the download backlog. ``run`` then asks who holds it, to say so.
    capped: bool = False
    #: Whether the last dispatch round saw nothing at fal and nothing to download (what its caps
    #: count: :meth:`cap_scope`): with nothing dispatched either, a tick had nothing to look after, and the
    #: conductor lets the next one come later (:func:`worker.conductor.idle_interval`).
    nothing_in_flight: bool = False
    #: The last :func:`jobs.store.followed_now` a dispatch round read, and when (monotonic): a
    #: round comes with every completion, heartbeats every 10 s and count for 60 s, so rounds
    #: within :data:`worker.steps.dispatch.FOLLOWED_REFRESH_SECONDS` of a read reuse it.
    followed: tuple[float, store.Followed] | None = None
    #: The dispatch rounds' holds on submits, each said within bounds (:class:`HoldLog`): the
    #: queue-wait back-off's, and the download backlog's.
    queue_hold: HoldLog = field(default_factory=HoldLog)
    backlog_hold: HoldLog = field(default_factory=HoldLog)
    #: The high-water mark of SQLite's timeline (``clock_marks``) as this runtime's tick last read
    #: or wrote it: the tick asks the database only when the time left the window around it that
    #: cannot change the answer (:func:`worker.steps.tick.catch_up_with_clock_step`). None: not
    #: read yet (or PostgreSQL, which keeps no mark).
    timeline_mark: datetime | None = None
    #: How many jobs dispatch rounds of this runtime have cancelled for a budget cap so far (a
    #: counter that only grows): work done, though nothing was sent — the tick that did it is
    #: not idle, and the conductor dispatches again at once while a batch is being wound down.
    budget_cancelled: int = 0
    #: The steps of this process that ended so far (:class:`StepsEnded`): counted by an
    #: embedded ``run``'s threads (:class:`worker.embedded.InProcessWorker`), whose progress
    #: refresh reads the batch again when it grew.
    steps_ended: StepsEnded = field(default_factory=StepsEnded)
    #: Called in the submit step's thread the moment fal's acceptance is recorded, with the
    #: job id, the request's handle and the job's batch id: a conductor in this process starts
    #: following it without a read.
    on_accepted: Callable[[str, RequestHandle, str], None] | None = None
    #: Where dispatch leaves a :class:`SubmitTicket` for each job it hands to ``enqueue_submit``,
    #: when that hand-off is a call in this process (the embedded run). None where the submit
    #: runs elsewhere (a Celery message carries only the job id, and a ticket would never be
    #: picked up).
    submit_tickets: dict[str, SubmitTicket] | None = None
    #: Likewise for downloads: where the conductor leaves the claim of each job it leased for
    #: its download while recording its completion (``worker.steps.download.handed_claim``),
    #: when downloads run on this process's threads. None elsewhere.
    download_claims: dict[str, DownloadClaim] | None = None
    #: ``reuse_outputs`` checks that failed so far, per job still waiting for one
    #: (:func:`worker.steps.dispatch._reuse`): dispatch runs in one process (the tick leader, or
    #: the embedded run), and a count that starts over only means more tries, never a payment.
    reuse_check_failures: dict[str, int] = field(default_factory=dict)
    #: Per batch, the local folder its outputs are in (None: they are in object storage, or the
    #: folder cannot be placed), as dispatch found it once for adopting outputs on disk
    #: (:mod:`worker.steps.adopt`); and the batches it said it adopts jobs of (said once).
    output_folders: dict[str, Path | None] = field(default_factory=dict)
    adopted_said: set[str] = field(default_factory=set)
    #: The batches whose jobs' sidecars the output storage (S3) could not be asked for (said once).
    sidecars_unread: set[str] = field(default_factory=set)
    #: The batches paused for another reason whose outputs could not be stored (a full disk, an
    #: S3 outage: :func:`worker.steps.download._pause_for_outputs`; said once, until one is stored).
    outputs_unstored_said: set[str] = field(default_factory=set)
    #: The (batch, host) pairs whose download refusal (the download policy: the allow-list, an
    #: internal address) this process said, the batch not paused by it
    #: (:func:`worker.steps.download._download_refused`): said once.
    download_refusals_said: set[tuple[str, str]] = field(default_factory=set)
    #: Download steps that crashed (a bug) so far, per job (:func:`worker.steps.download.crashed`):
    #: past a few the job's batch is paused instead of the job being taken again for ever.
    download_crashes: dict[str, int] = field(default_factory=dict)
    #: Why this process works on the database no more, once it found the schema older than its
    #: own (``alembic downgrade`` under it: :func:`jobs.db.schema_behind`), by a step that met a
    #: missing column or by the conductor's heartbeat: later steps leave their jobs as they are
    #: (:mod:`worker.step_outage`), and the conductor ends (a worker exits 2). None: not found.
    schema_behind: str | None = None
    #: Whether a step of this runtime said why already (:func:`worker.step_outage.left_for_schema`).
    schema_behind_said: bool = False
    #: Cancels fal failed to take so far, per job, and the requests given up after a few
    #: (:mod:`worker.steps.cancel_tries`): ``wanbatch cancel`` ends instead of asking for ever.
    cancel_tries: CancelTries = field(default_factory=CancelTries)
    #: Held while a sequence of this runtime's cancels is under way at fal, on its own thread
    #: (:mod:`worker.steps.cancels`): one left behind by a tick keeps the next from sending the
    #: same cancels again, or others out of their order, meanwhile.
    cancel_lane: threading.Lock = field(default_factory=threading.Lock)
    #: Requests sent with another API key that fal told this key it does not know (or refused):
    #: :mod:`worker.steps.other_key`. A run ends once only such requests are left.
    other_keys: OtherKeys = field(default_factory=OtherKeys)
    #: Input URLs fal said it could not download (a user's URL that died, an upload fal's storage
    #: dropped): the jobs not sent yet that carry one are not sent with it (:mod:`worker.steps.dead_inputs`).
    dead_inputs: DeadInputs = field(default_factory=DeadInputs)
    #: Sends recorded before a POST that then never went out, whose give-back the database did
    #: not take: the reconciler gives their jobs back as never sent (:mod:`worker.steps.unsent`).
    unsent: ProvenUnsent = field(default_factory=ProvenUnsent)
    #: Accepted submissions not recorded yet, and whether the database's disk is full (nothing
    #: new is sent then): :mod:`worker.steps.unrecorded`.
    unrecorded: Unrecorded = field(init=False)
    #: Marks in the database the jobs whose accepted submission ``unrecorded`` holds, so that no
    #: other process calls their outcome unknown while this one lives: :mod:`worker.steps.held`.
    held: HeldMarks = field(init=False)
    #: The leases of this runtime's POSTs in flight, kept alive while fal's answer is awaited
    #: (:mod:`worker.steps.keepalive`).
    submit_leases: StepLeases = field(init=False)
    #: The leases of this runtime's downloads while their videos are fetched and their outputs
    #: stored (an upload to object storage may wait on a slow answer past a lease):
    #: :mod:`worker.steps.keepalive`.
    output_leases: StepLeases = field(init=False)
    #: The download attempts writing local outputs now, and whether the run is stopping: a run
    #: that stops under control leaves none of their temporary files (:mod:`worker.steps.output_writes`).
    output_writes: OutputWrites = field(default_factory=OutputWrites)
    #: Whether fal answers this process's submits, and the hold on them while it does not
    #: (:mod:`worker.steps.fal_reach`).
    fal_reach: FalReach = field(default_factory=FalReach)
    #: Whether this process's downloads connect to fal's media hosts, and the hold on them
    #: while they do not (:mod:`worker.steps.download_reach`).
    download_reach: DownloadReach = field(default_factory=DownloadReach)
    #: Whether fal's media host serves this process's downloads (not a 5xx/429 or a body dropped
    #: midway), and each waiting job's backoff while it does not
    #: (:class:`~worker.steps.download_reach.DownloadTrouble`).
    download_trouble: DownloadTrouble = field(default_factory=DownloadTrouble)
    #: Whether another live process shares the database's submit pacing, so that each POST of
    #: this one takes its slot there (:mod:`worker.steps.shared_pacing`).
    pacing: SharedPacing = field(default_factory=SharedPacing)
    #: Of the account-wide limits (:data:`jobs.account_limits.ACCOUNT_WIDE`), those on which
    #: another live process dispatching for the same account differs from this one's own
    #: settings: one part per such process (``another run (bob-laptop pid 4242) runs with
    #: WANBATCH_MAX_OUTSTANDING=40``), by variable; ``run``'s held message names them
    #: (:mod:`worker.steps.peer_limits`).
    peer_limits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: This process's own settings while :attr:`settings` holds the strictest limits of the live
    #: processes (:meth:`apply_limits`); None: :attr:`settings` are its own.
    _own: Settings | None = field(default=None, init=False, repr=False)
    #: The origin (``scheme://host:port``) of this runtime's fal queue (``WANBATCH_FAL_QUEUE_URL``):
    #: recorded with every request it sends (``Job.fal_origin``), and the only requests it asks
    #: about (:meth:`reach`).
    queue_origin: str = field(init=False)
    #: The reach the tick under way read first (:meth:`reach_once`), reused by its other steps;
    #: None outside a tick, or before its first read.
    _tick_reach: Reach | None = field(default=None, init=False, repr=False)
    #: Whether a tick is under way (:meth:`reach_once`).
    _in_tick: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.queue_origin = queue_origin(self.settings.fal_queue_url)
        self.unrecorded = Unrecorded(self.settings.database_url)
        self.held = HeldMarks(self.engine, self.unrecorded)  # its retry: worker.runtime.build_runtime
        self.submit_leases = StepLeases(self.engine, self.settings.lease_seconds)
        lease = self.settings.lease_seconds
        self.output_leases = StepLeases(self.engine, lease, what="output", linger=lease / 3, warn_lost=False)
        if self.bucket is None:
            self.bucket = RateBucket(self.settings.submit_rate / (1 + self.settings.submit_jitter_allowance))
        if self.limiter is None:
            self.limiter = limiter_for(self.settings)
        if self.fal_reach.recorder is None:
            self.fal_reach.recorder = self.record_fal_hold

    @property
    def own_settings(self) -> Settings:
        """This process's own settings, whatever limits it applies now (:meth:`apply_limits`): what
        it publishes with its heartbeat (another's value is never passed on as its own)."""
        return self._own if self._own is not None else self.settings

    def apply_limits(self, applied: Settings) -> bool:
        """Dispatch and submit with ``applied`` (:attr:`own_settings` with the strictest
        account-wide limits of the live processes, :func:`jobs.account_limits.strictest`) from
        now on: the settings every step reads, the in-process limiter's (its spacing) and the
        dispatch bucket's rate. True when that changed anything."""
        own = self.own_settings
        if applied is self.settings:
            return False
        self._own = None if applied is own else own
        self.settings = applied
        if isinstance(self.limiter, LocalGCRA | RedisGCRA):
            self.limiter.settings = applied
        if self.bucket is not None:
            self.bucket.set_rate(applied.submit_rate / (1 + applied.submit_jitter_allowance))
        return True

    def record_fal_hold(self, hold: Hold | None) -> None:
        """Record in the database that this process holds its submits because fal cannot be
        reached from it (``hold``), or that it no longer does (None): for ``status`` and the
        dashboard (:func:`jobs.listing.fal_holds`), under this process's name (``host:pid:``)
        and this runtime's batches (every batch for a distributed worker).

        Its end (None) also ends the waits of the jobs given back while fal was unreachable
        (:meth:`end_fal_waits`)."""
        owner = process_prefix()
        scopes = self.batch_ids or frozenset({EVERY_BATCH})
        with db.session_scope(self.engine) as session:
            if hold is None:
                store.release_fal_hold(session, owner, scopes)
                self.end_fal_waits(session)
                return
            store.hold_fal(
                session,
                owner,
                scopes,
                since=hold.since,
                next_probe_at=hold.next_probe_at,
                pause_seconds=hold.pause_seconds,
                error=hold.error,
                now=utcnow(),
            )

    def end_fal_waits(self, session: Session) -> None:
        """Make due at once this runtime's jobs that wait only for a hold on fal that is over.

        A job given back because fal could not be reached is due when the holding process's
        next probe may go, up to a minute ahead (:mod:`worker.steps.fal_reach`): stored on the
        job, that backoff outlived the process that stopped holding, and the next ``run``, whose
        fal answered, sent the job a minute late. A hold still renewed by another process (a
        worker on another host, another run of the batch) keeps its jobs waiting; one whose
        process is known to have ended (a pid of this host that no longer runs) does not."""
        now = utcnow()
        live_since = now - timedelta(seconds=FAL_HOLD_STALE_SECONDS)
        owners = store.live_fal_hold_owners(session, live_since=live_since)
        freed = store.end_fal_waits(
            session,
            self.batch_ids,
            now=now,
            longest=timedelta(seconds=FAL_PROBE_PAUSE_MAX),
            live_since=live_since,
            ended=[owner for owner in owners if processes.owner_gone(owner)],
        )
        if freed:
            log.info(
                "%d job(s) held back while fal was unreachable are due again at once",
                freed,
                extra={"event": "submit.fal_waits_ended"},
            )

    @property
    def beat_owner(self) -> str:
        """The heartbeat owner of this runtime's process: :attr:`owner` with the proof of its
        identity (:func:`jobs.processes.beat_owner`), as its conductor writes its rows — and as
        whatever tells its own rows from another process's must name it (:meth:`cap_scope`)."""
        return processes.beat_owner(self.owner)

    def lease_until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.settings.lease_seconds)

    def in_scope(self, batch_id: str) -> bool:
        """Whether this runtime works on ``batch_id`` (always, without a scope)."""
        return self.batch_ids is None or batch_id in self.batch_ids

    def reach(self, session: Session) -> Reach:
        """The requests this runtime's provider holds: the only ones it may ask about (status,
        stream, cancel) or download from.

        A simulation's requests are its simulator's, and real fal's are fal's: asked about a
        request it never had, either answers 404, and the job would end "lost" — a paid one
        while fal still runs and bills it. So a ``--simulate`` run reaches its own batch only
        (whatever simulator sent it: a resumed run hands its requests to its new one), and a
        runtime talking to fal every batch but the simulations — and of those, only the
        requests sent to its own fal queue (``Job.fal_origin``): a run pointed at another queue
        (another simulator, another deployment) on the same database follows its own, and this
        one leaves them alone. The distributed workers share one queue URL, so they all reach
        the same requests.
        """
        if self.simulated:
            return Reach(batch_ids=self.batch_ids or frozenset(), exclude_batch_ids=frozenset())
        memo = self._tick_reach
        if memo is not None:
            return memo
        reach = Reach(
            batch_ids=None, exclude_batch_ids=simulated_batch_ids(session), sent_to=self.queue_origin
        )
        if self._in_tick:
            self._tick_reach = reach
        return reach

    @contextlib.contextmanager
    def reach_once(self) -> Iterator[None]:
        """While inside (one tick), :meth:`reach` reads the simulations' batches once, and every
        later step of the tick reuses what it read: the tick read them four times a round (the
        reconciler, the poll, the downloads, the streams' catch-up), 4 of its ~35 statements.

        Why what the first step read holds for the others: a batch is made a simulation when it
        is stored (``Batch.simulated`` never changes after), so the set only ever gains batches
        stored since the read, within the tick's own duration. Such a batch has nothing any
        step of the tick could take for fal's: its requests carry their simulator's queue
        (``Job.fal_origin``, which :attr:`Reach.sent_to` keeps out as well), its submits hold
        the fresh leases their ``--simulate`` run took, and nothing of it is due for a status
        yet; the next tick reads the set anew. A batch deleted since only leaves an id no job
        has in the set."""
        self._in_tick = True
        try:
            yield
        finally:
            self._in_tick = False
            self._tick_reach = None

    def sent_elsewhere(self, job: JobView | JobRecord) -> str | None:
        """Why a 404 (or a refusal) of fal about ``job``'s request proves nothing, or None when it
        does: the request was sent with another API key than this runtime's, or (a simulation) to
        the simulator of another live process (:meth:`_other_simulator`). fal keeps a request
        for the account, so another key of the same account may ask about it, but a key of
        another account is told it does not exist: only a process with the key it was sent with
        may take fal's "not found" as final. (A request sent with no key recorded, before the
        key was kept, is taken as this key's, as before.)"""
        sent_with, mine = getattr(job, "api_key_id", None), api_key_id(self.settings)
        if sent_with is not None and sent_with != mine:
            return f"sent with another API key (key id {sent_with}, this process has {mine})"
        return self._other_simulator(job)

    def other_key(self, job: JobView | JobRecord) -> str | None:
        """The key id ``job``'s request was sent with when it is not this runtime's key; None
        when it is, or none was recorded."""
        sent_with = getattr(job, "api_key_id", None)
        return sent_with if sent_with is not None and sent_with != api_key_id(self.settings) else None

    def key_refused(self, job_id: str, request_id: str, sent_with: str, *, cancel: bool = False) -> bool:
        """fal answered "not found" (or refused) about ``job_id``'s ``request_id``, sent with the
        key ``sent_with`` (another than this runtime's), to this runtime's key — to a status, a
        result, or (``cancel``) a cancel. Noted in memory (:attr:`other_keys`) and, the first
        time this process meets it, in the database (:func:`jobs.store.note_key_refused`), where
        every process reads it: a ``run`` watching the workers, ``cancel``, ``status``.
        Whether it is the first time (the caller warns then, and says it at debug level after):
        of a cancel, the first refused cancel (a status refused before says nothing of it)."""
        known = self.other_keys.noted(job_id, request_id)
        first = not (self.other_keys.cancel_noted(job_id, request_id) if cancel else known)
        if not known:
            with db.session_scope(self.engine) as session:
                store.note_key_refused(
                    session,
                    job_id,
                    request_id,
                    sent_with=sent_with,
                    key_id=api_key_id(self.settings),
                    now=utcnow(),
                )
        if cancel:
            self.other_keys.cancel_refused(job_id, request_id, sent_with)
        else:
            self.other_keys.refused(job_id, request_id, sent_with)
        return first

    def followed_with_this_key(
        self, session: Session, job_id: str, request_id: str, sent_with: str | None
    ) -> bool:
        """fal answered this runtime's key about ``job_id``'s ``request_id`` (a status, a
        stream's event, a result): a request ``sent_with`` another key (of the same fal account,
        then) is recorded as this key's from now on (:func:`jobs.store.followed_with_key`), in
        the caller's transaction: followed here, counted against this key's caps, and no longer
        said to wait for a process with the other key. Whether it was another key's."""
        mine = api_key_id(self.settings)
        if sent_with is None or sent_with == mine:
            return False
        self.other_keys.answered(job_id)
        if not store.followed_with_key(session, job_id, request_id, mine):
            return False
        log.info(
            "job %s: fal answered about request %s, sent with another API key (key id %s), when "
            "asked with this process's (key id %s): the same fal account; followed with this key",
            job_id,
            request_id,
            sent_with,
            mine,
            extra={"event": "job.key_followed", "job_id": job_id, "request_id": request_id},
        )
        return True

    def _other_simulator(self, job: JobView | JobRecord) -> str | None:
        """A simulation's request that the simulator of another live process of this host accepted
        (its origin, ``Job.fal_origin``, is the one that process's claim on the batch names:
        :func:`jobs.store.live_simulators`): this run's simulator, given the requests "at fal" when
        it started, never had it, and its 404 proves nothing — that process follows the request.
        None otherwise: a request this run's simulator was given, or one whose simulator ended
        with its process (lost indeed). Asked only of an answer that would end the job: one read."""
        origin = getattr(job, "fal_origin", None)
        if not self.simulated or origin is None or origin == self.queue_origin:
            return None
        with db.read_scope(self.engine) as session:
            pid = store.live_simulators(session, job.batch_id).get(origin)
        if pid is None:
            return None
        return f"accepted by the simulator of process {pid} of this host ({origin}), which still runs"

    def cap_scope(self) -> CapScope:
        """Which jobs this runtime's caps count (:meth:`jobs.store.CapScope.of`): the requests
        its provider holds for its key and the downloads it makes itself, never jobs that only
        another process (another batch's run, another simulator) can move on. The distributed
        workers' leader (every batch) counts every key's requests: a worker with another
        ``FAL_KEY`` sends with its own (:attr:`jobs.store.CapScope.every_key`). Requests at
        another fal queue count against the outstanding cap only while another live process
        follows them, and never in the queue-wait back-off (:attr:`jobs.store.CapScope.origin`)."""
        return CapScope.of(
            api_key_id=api_key_id(self.settings),
            batch_ids=self.batch_ids,
            simulated=self.simulated,
            every_key=self.batch_ids is None,
            origin=self.queue_origin,
            me=self.beat_owner,
        )

    def fence(self, job: JobRecord) -> Fence:
        """``job`` as this runtime just read (or claimed) it, held by this runtime's worker."""
        return Fence.of(job, self.owner)


def outcome_error(rt: Runtime, job_id: str, outcome: str) -> dict[str, str | None]:
    """Why a step ended as ``outcome``, for its line (:func:`worker.logs.step_done`): the job's
    stored ``error`` and ``error_type`` after an outcome that stored them
    (:data:`~worker.logs.OUTCOMES_WITH_ERROR`), else what the step noted
    (:func:`worker.logs.note_error`), else nothing. A read that fails (the database went away
    after the step) only leaves them out: the line is still written."""
    noted = logs.noted_error()
    if noted is not None:
        return {"error": noted[0], "error_type": noted[1]}
    if outcome not in logs.OUTCOMES_WITH_ERROR:
        return {}
    try:
        with db.read_scope(rt.engine) as session:
            job = store.job_snapshot(session, job_id)
    except Exception:  # the line matters more than its detail
        log.debug("job %s: its error not read for its step line", job_id, exc_info=True)
        return {}
    return {"error": job.error, "error_type": job.error_type}


def in_seconds(seconds: float) -> datetime:
    """The moment ``seconds`` from now (when a job is due again), ``seconds`` clamped to a year
    either way (:data:`~jobs.settings.MAX_SECONDS`): a delay derived from a setting (``1 / rate``)
    can be ``inf`` or ``1e300``, and ``timedelta`` raised OverflowError on it mid-run — a
    traceback, and a job given back never. A ``nan`` is taken as the longest delay."""
    if math.isnan(seconds):
        seconds = MAX_SECONDS
    return utcnow() + timedelta(seconds=max(-MAX_SECONDS, min(seconds, MAX_SECONDS)))


def handle_of(job: JobView, queue_url: str) -> RequestHandle:
    """The request handle of a job at fal, on the configured queue only.

    Stored URLs are used only when they are on ``queue_url``'s origin and name this request
    (:meth:`RequestHandle.trusted`); a row written before that rule, with URLs a provider
    pointed elsewhere, is followed on the queue instead: status, result and cancel carry the key.
    """
    assert job.request_id is not None
    return RequestHandle.trusted(
        queue_url,
        job.endpoint,
        job.request_id,
        status_url=job.status_url,
        response_url=job.response_url,
        cancel_url=job.cancel_url,
    )


def tail_of_fal_queue_first(jobs: Iterable[Job]) -> list[Job]:
    """``jobs`` (requests we hold at fal, to be cancelled) in the order to cancel them: newest
    submit first, the tail of fal's queue.

    fal's queue is FIFO per account: when a running request ends (or is cancelled) a slot frees,
    and fal starts the request at the *head* of the queue at once. What we call ``queued`` lags
    fal: the oldest of them have often started already. Cancelling oldest first would cancel
    such a request, free its slot, and let fal start our next queued one — which our next
    cancel, a few milliseconds later, then ends *while running*: billed. Cancelling from the
    tail, each cancel removes a request nothing is waiting behind (of ours); by the time a
    cancel reaches one that in fact runs, every request of ours queued after it is cancelled
    already, so the slot it frees goes to no request of ours.
    """
    return sorted(jobs, key=lambda j: (j.submitted_at or j.created_at, j.item_index, j.variant), reverse=True)
