"""The numbers ``/metrics`` publishes about the work, read from the database when it is scraped.

The database is the system of record: every job's state, attempts, money and timestamps are
there, whichever process (embedded ``run``, any number of workers on any number of hosts, a
restarted one) did the work. Counting there gives every deployment the same, complete numbers,
where process-local counters (:mod:`worker.telemetry`) only know what one process saw since it
started.

A scrape must stay cheap however many jobs are stored, so nothing here loads jobs into Python;
the store's aggregate queries do the work (:mod:`jobs.store.metrics`), and ``serve`` keeps the
sums of the jobs finished long ago between scrapes (:class:`FinishedTotals`), so that a scrape
reads only the unfinished jobs and those finished lately:

* :func:`~jobs.store.job_totals` — ``GROUP BY state, endpoint, error_type``: counts, attempts,
  retries, money, duplicate charges and errors by type in one pass over the jobs. Money is
  summed with the very expressions ``status`` and ``cost`` use, so they agree to the cent;
* :func:`~jobs.store.batch_states`, :func:`~jobs.store.count_events_into` (ambiguous submits)
  and :func:`~jobs.store.delivery_counts` (the webhook inbox);
* :func:`~jobs.store.duration_buckets`, one ``GROUP BY bucket`` per histogram: the database
  returns a row per bucket.

Histograms are over the finished jobs (a terminal state), each counted once with its last
attempt's timestamps, which no longer move: they only grow as jobs finish, like counters, so
``rate()`` and ``histogram_quantile()`` work on them (an unfinished job's times move with a
retry). Durations are measured on this side (``submitted_at``, ``completed_at`` and
``finished_at`` are our clock); ``inference`` is fal's own ``inference_time``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from jobs import listing, store
from jobs.models import BatchState, utcnow
from jobs.states import JobState

ZERO = Decimal(0)
#: ``wanbatch_batches{state=…}`` of the batches whose every job finished (:func:`batch_phases`).
DONE = "done"

#: Upper bounds (seconds) of every duration histogram's buckets: from sub-second steps (the
#: simulator, downloads) to the hours a scheduled or queued job may wait.
DURATION_BUCKETS: tuple[float, ...] = (
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    21600.0,
    86400.0,
)

#: Most ``(state, error_type)`` groups published; the rest are summed per state as
#: ``error_type="other"`` (fal names its own error types: a provider inventing one per request
#: must not blow up the number of series a scrape returns).
MAX_ERROR_GROUPS = 50
#: Longest ``error_type`` label kept (longer ones are cut).
MAX_ERROR_TYPE_LENGTH = 64


@dataclass(slots=True)
class Usd:
    """Money of a group of jobs, exact: as :class:`jobs.store.BatchMoney` (estimated, spent,
    reserved) and :class:`jobs.store.BatchCost` (wasted) define it."""

    estimated: Decimal = ZERO
    spent: Decimal = ZERO
    reserved: Decimal = ZERO
    wasted: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class Histogram:
    """A distribution of durations: ``buckets[i]`` jobs took at most ``bounds[i]`` seconds and more
    than the bound before it (not cumulative); the last entry is beyond every bound (+Inf)."""

    bounds: tuple[float, ...]
    buckets: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them: cumulative, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*(repr(float(b)) for b in self.bounds), "+Inf"), self.buckets, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every number of one scrape.

    * ``jobs``: jobs per state, every :class:`~jobs.states.JobState` present (0 when none).
    * ``batches``: batches ``active``, ``paused`` (by fal's refusal, a budget or the user) with
      jobs left, ``done`` and ``cancelled`` (:func:`batch_phases`). ``unattended_batches``:
      see :func:`unattended_batches`.
    * ``attempts``: submissions counted on the jobs (every request sent to fal, one a window's
      end cancelled in fal's queue included: :data:`jobs.store.SENT_ATTEMPTS`). ``retries``:
      attempts beyond each job's first. Both only grow, as does ``possible_duplicate_charges``
      (:data:`jobs.store.metrics.SENT_DUPLICATES`). ``ambiguous_submits``: times a job's
      submit ended with its outcome unknown (``submit_unknown``).
    * ``usd``: money per endpoint. ``errors``: jobs holding a recorded error, per
      ``(state, error_type)``. ``durations``: the histograms, by name
      (:data:`jobs.store.DURATIONS` says what each measures).
    * ``webhook_inbox``: the receiver's stored deliveries (``stored``, ``repeats``,
      ``unprocessed``, ``ignored``).
    """

    jobs: dict[str, int]
    batches: dict[str, int]
    unattended_batches: int
    attempts: int
    retries: int
    ambiguous_submits: int
    possible_duplicate_charges: int
    confirmed_duplicate_charges: int
    usd: dict[str, Usd]
    errors: dict[tuple[str, str], int]
    durations: dict[str, Histogram]
    webhook_inbox: dict[str, int]


#: A finished job's numbers join :class:`FinishedTotals` this long after its ``finished_at``:
#: longer than any transaction that finishes jobs takes to commit, plus the clocks' disagreement
#: between hosts (``finished_at`` is the finishing process's clock, the boundary this one's).
SETTLE = timedelta(minutes=10)

#: What :func:`jobs.store.job_totals` sums per group, in its order (ints, then Decimals).
_TOTALS_FIELDS = (
    "jobs",
    "attempts",
    "retries",
    "possible_duplicate_charges",
    "confirmed_duplicate_charges",
    "estimated_usd",
    "spent_usd",
    "reserved_usd",
    "wasted_usd",
)

#: Groups of :func:`jobs.store.job_totals`, by ``(state, endpoint, error_type)``: their sums.
Groups = dict[tuple[JobState, str, str | None], list[Any]]
#: Histograms by name: jobs per bucket and the sum of the durations per bucket.
Buckets = dict[str, tuple[list[int], list[float]]]


def _add_totals(groups: Groups, totals: list[store.JobTotals]) -> None:
    for group in totals:
        values = [getattr(group, name) for name in _TOTALS_FIELDS]
        kept = groups.get((group.state, group.endpoint, group.error_type))
        if kept is None:
            groups[(group.state, group.endpoint, group.error_type)] = values
        else:
            for index, value in enumerate(values):
                kept[index] += value


def _add_durations(session: Session, buckets: Buckets, scope: store.MetricsScope | None) -> None:
    for name in store.DURATIONS:
        counts, sums = buckets.setdefault(
            name, ([0] * (len(DURATION_BUCKETS) + 1), [0.0] * (len(DURATION_BUCKETS) + 1))
        )
        for index, n, total in store.duration_buckets(session, name, DURATION_BUCKETS, scope):
            counts[index] += n
            sums[index] += total


class FinishedTotals:
    """The numbers of the jobs that finished before a moment (``until``), kept between scrapes by
    one ``wanbatch serve`` process, so that a scrape reads only the other jobs — the unfinished
    ones and those finished within :data:`SETTLE` — and its cost does not grow with the jobs
    ever stored (it was a pass over every job per aggregate, five per scrape: 1 s at 150,000
    jobs, 8 s at a million, every 15 s).

    Why a cache in the process rather than sums kept in the database as jobs finish (as
    :class:`jobs.models.BatchTotals` keeps money): those rows would be written by every
    finishing transaction of every batch and worker — one row per ``(state, endpoint,
    error_type)`` and histogram bucket, a lock every finishing job of the deployment would
    queue on — and every path that changes a finished job would have to take its numbers out
    and put them back, float sums included (which a subtraction does not restore exactly).
    Here the hot path writes nothing more, and the sums are built by the very queries that
    summed every job before, so the numbers are the same.

    Finished jobs rarely change, but some do: a late proof takes a ``failed`` or ``cancelled``
    job back to ``queued`` (:func:`jobs.store.adopt_late_proof`, ``adopt_own_proof``,
    ``adopt_cancelled_proof``), and a duplicate charge proved later is noted on a finished job's
    books (:func:`jobs.store.note_duplicate_charge`, ``note_request``). Each such change writes an
    event from a terminal state, and a scrape counts those first
    (:func:`jobs.store.count_finished_changes`, a partial index): when the count moved, the sums
    are built anew (one full pass, as every scrape did before), so a job is never counted twice
    nor lost. Otherwise the sums move on to ``now - SETTLE``, reading only the jobs that
    finished in between (``ix_jobs_finished_at``). A count, not a high-water mark: it moves
    whenever such a change commits, whatever order transactions commit in.

    What it relies on: a finishing transaction commits within :data:`SETTLE` of the
    ``finished_at`` it writes (as this host's clock reads it), and a finished job changes only
    through a transition or a note (the event above). A job whose finishing committed later
    than that would be left out until the sums are next built anew. Not shared between
    processes or replicas (each builds its own at its first scrape); thread-safe.
    """

    def __init__(self, settle: timedelta = SETTLE, clock: Callable[[], datetime] = utcnow) -> None:
        self.settle = settle
        self.clock = clock
        self.lock = threading.Lock()
        #: Jobs finished before this are in the sums; None: no sums yet.
        self.until: datetime | None = None
        self.changes = -1
        self.groups: Groups = {}
        self.buckets: Buckets = {}
        #: Times the sums were built from every finished job (the first scrape's included).
        self.rebuilds = 0

    def reset(self) -> None:
        """Forget the sums: the next scrape builds them anew."""
        self.until = None
        self.groups = {}
        self.buckets = {}

    def advance(self, session: Session) -> datetime:
        """Bring the sums up to date in ``session`` (one snapshot of the database); the moment
        they stand at: the jobs finished since are the scrape's to read."""
        changes = store.count_finished_changes(session)
        until = self.clock() - self.settle
        if self.until is None or changes != self.changes:
            self.reset()
            scope = store.MetricsScope("sealed", until=until)
            self.rebuilds += 1
        elif until > self.until:
            scope = store.MetricsScope("finished", since=self.until, until=until)
        else:
            return self.until
        try:
            _add_totals(self.groups, store.job_totals(session, scope))
            _add_durations(session, self.buckets, scope)
        except BaseException:
            self.reset()
            raise
        self.until, self.changes = until, changes
        return until


def snapshot(session: Session, finished: FinishedTotals | None = None) -> Snapshot:
    """Read every number ``/metrics`` publishes (a handful of aggregate queries).

    ``finished``: the sums of the jobs finished long ago, kept by the caller between calls
    (:class:`FinishedTotals`); then only the other jobs are read. None: every job is read. The
    numbers are the same either way. ``session`` should read one snapshot of the database
    (:func:`jobs.db.read_scope` with ``snapshot``)."""
    groups: Groups = {}
    buckets: Buckets = {}
    if finished is None:
        _add_totals(groups, store.job_totals(session))
        _add_durations(session, buckets, None)
        return _snapshot(session, groups, buckets)
    with finished.lock:
        since = finished.advance(session)
        for key, values in finished.groups.items():
            groups[key] = list(values)
        for name, (counts, sums) in finished.buckets.items():
            buckets[name] = (list(counts), list(sums))
        # The rest: two index ranges, read apart so that neither plan may become a pass over
        # every job.
        for live in (store.MetricsScope("unfinished"), store.MetricsScope("finished", since=since)):
            _add_totals(groups, store.job_totals(session, live))
            _add_durations(session, buckets, live)
    return _snapshot(session, groups, buckets)


def _snapshot(session: Session, groups: Groups, buckets: Buckets) -> Snapshot:
    jobs = {state.value: 0 for state in JobState}
    usd: dict[str, Usd] = {}
    errors: dict[tuple[str, str], int] = {}
    attempts = retries = possible = confirmed = 0
    for (job_state, endpoint, error_type), values in groups.items():
        group = store.JobTotals(job_state, endpoint, error_type, *values)
        state = group.state.value
        jobs[state] += group.jobs
        attempts += group.attempts
        retries += group.retries
        possible += group.possible_duplicate_charges
        confirmed += group.confirmed_duplicate_charges
        if group.error_type is not None:
            key = (state, group.error_type[:MAX_ERROR_TYPE_LENGTH])
            errors[key] = errors.get(key, 0) + group.jobs
        money = usd.setdefault(group.endpoint, Usd())
        money.estimated += group.estimated_usd
        money.spent += group.spent_usd
        money.reserved += group.reserved_usd
        money.wasted += group.wasted_usd
    durations = {}
    for name in store.DURATIONS:
        counts, sums = buckets[name]
        durations[name] = Histogram(bounds=DURATION_BUCKETS, buckets=tuple(counts), total=sum(sums))
    unfinished = store.unfinished_batches(session)
    return Snapshot(
        jobs=jobs,
        batches=batch_phases(session, unfinished),
        unattended_batches=unattended_batches(session, unfinished),
        attempts=attempts,
        retries=retries,
        ambiguous_submits=store.count_events_into(session, JobState.SUBMIT_UNKNOWN),
        possible_duplicate_charges=possible,
        confirmed_duplicate_charges=confirmed,
        usd=usd,
        errors=bounded(errors),
        durations=durations,
        webhook_inbox=store.delivery_counts(session),
    )


def batch_phases(
    session: Session, unfinished: dict[str, store.UnfinishedBatch] | None = None
) -> dict[str, int]:
    """Batches by what they are doing, every key present: ``active`` and ``paused`` (by the user,
    a refused account or a budget) with a job left to finish, ``done`` (no job left: every one
    finished), ``cancelled``. As ``status``'s phase, but for ``waiting`` and ``deadline`` (a
    schedule's, which counts as ``active`` or ``paused`` here: no schedule is read per batch).

    The stored ``Batch.state`` alone said ``active`` of every batch that ever finished, for ever.
    Read cheaply: the batches by stored state (one ``GROUP BY`` over the batches) less those with
    unfinished jobs (``unfinished``, :func:`jobs.store.unfinished_batches`, read through the
    unfinished jobs only; the scrape reads it for :func:`unattended_batches` anyway)."""
    if unfinished is None:
        unfinished = store.unfinished_batches(session)
    stored = store.batch_states(session)
    working = {BatchState.ACTIVE.value: 0, BatchState.PAUSED.value: 0}
    for batch in unfinished.values():
        if batch.state == BatchState.CANCELLED:
            continue
        paused = batch.state == BatchState.PAUSED or batch.paused_by_user
        working[(BatchState.PAUSED if paused else BatchState.ACTIVE).value] += 1
    done = sum(stored[state] for state in working) - sum(working.values())
    return {**stored, **working, DONE: done}


def unattended_batches(session: Session, batches: dict[str, store.UnfinishedBatch] | None = None) -> int:
    """Batches with work that needs a process and that no process works on (no heartbeat within
    :data:`jobs.listing.PROCESSING_STALE_SECONDS` of a process not known to have ended: a killed
    ``run`` of this host counts at once, :func:`jobs.listing.is_processing`): requests at fal or
    downloads nobody will collect, or jobs that may be sent now or when the schedule opens. A
    batch its user or fal paused, with nothing at fal, waits on purpose and is not counted. What
    an operator alerts on: an overnight render whose run died in the evening."""
    now = utcnow()
    if batches is None:
        batches = store.unfinished_batches(session)
    beats = listing.heartbeats(session, list(batches), now=now)
    unattended = 0
    for batch_id, batch in batches.items():
        if listing.is_processing(beats.get(batch_id), now=now):
            continue
        busy = any(batch.counts.get(s, 0) for s in listing.BUSY_STATES)
        sendable = batch.state == BatchState.ACTIVE and not batch.paused_by_user
        if busy or (sendable and any(batch.counts.get(s, 0) for s in listing.WAITING_STATES)):
            unattended += 1
    return unattended


def bounded(errors: dict[tuple[str, str], int], limit: int = MAX_ERROR_GROUPS) -> dict[tuple[str, str], int]:
    """The ``limit`` largest ``(state, error_type)`` groups; the rest of each state's jobs with
    an error become its ``(state, "other")``."""
    ranked = sorted(errors.items(), key=lambda item: (-item[1], item[0]))
    out = dict(ranked[:limit])
    for (state, _), n in ranked[limit:]:
        out[(state, "other")] = out.get((state, "other"), 0) + n
    return out
