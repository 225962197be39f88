"""The numbers ``/metrics`` publishes about the work, read from the database when it is scraped.

The database is the system of record: every job's state, attempts, money and timestamps are
there, whichever process (embedded ``run``, any number of workers on any number of hosts, a
restarted one) did the work. Counting there gives every deployment the same, complete numbers,
where process-local counters (:mod:`worker.telemetry`) only know what one process saw since it
started.

A scrape must stay cheap on a database of 100,000 jobs, so nothing here loads jobs into Python;
the store's aggregate queries do the work (:mod:`jobs.store`, "metrics"):

* :func:`~jobs.store.job_totals` — ``GROUP BY state, endpoint, error_type``: counts, attempts,
  retries, money, duplicate charges and errors by type in one pass over the jobs. Money is
  summed with the very expressions ``status`` and ``cost`` use, so they agree to the cent;
* :func:`~jobs.store.batch_states`, :func:`~jobs.store.count_events_into` (ambiguous submits)
  and :func:`~jobs.store.delivery_counts` (the webhook inbox);
* :func:`~jobs.store.duration_histogram`, one ``GROUP BY bucket`` per histogram: the database
  returns a row per bucket.

Histograms are over every job in the database, each job counted once with its latest attempt's
timestamps: they grow as jobs finish, like counters, so ``rate()`` and ``histogram_quantile()``
work on them. Durations are measured on this side (``submitted_at``, ``completed_at`` and
``finished_at`` are our clock); ``inference`` is fal's own ``inference_time``.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.orm import Session

from jobs import listing, store
from jobs.models import BatchState, utcnow
from jobs.states import JobState

ZERO = Decimal(0)

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
    * ``batches``: batches ``active``, ``paused`` (by fal's refusal, a budget or the user) and
      ``cancelled``. ``unattended_batches``: see :func:`unattended_batches`.
    * ``attempts``: submissions counted on the jobs (a request sent to fal; one cancelled in
      fal's queue at a window's end and sent again counts once). ``retries``: attempts beyond
      each job's first. ``ambiguous_submits``: times a job's submit ended with its outcome
      unknown (``submit_unknown``).
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


def snapshot(session: Session) -> Snapshot:
    """Read every number ``/metrics`` publishes (a handful of aggregate queries)."""
    jobs = {state.value: 0 for state in JobState}
    usd: dict[str, Usd] = {}
    errors: dict[tuple[str, str], int] = {}
    attempts = retries = possible = confirmed = 0
    for group in store.job_totals(session):
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
        counts, total = store.duration_histogram(session, name, DURATION_BUCKETS)
        durations[name] = Histogram(bounds=DURATION_BUCKETS, buckets=tuple(counts), total=total)
    return Snapshot(
        jobs=jobs,
        batches=store.batch_states(session),
        unattended_batches=unattended_batches(session),
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


def unattended_batches(session: Session) -> int:
    """Batches with work that needs a process and that no process works on (no heartbeat within
    :data:`jobs.listing.PROCESSING_STALE_SECONDS`): requests at fal or downloads nobody will
    collect, or jobs that may be sent now or when the schedule opens. A batch its user or fal
    paused, with nothing at fal, waits on purpose and is not counted. What an operator alerts
    on: an overnight render whose run died in the evening."""
    now = utcnow()
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
