"""Metrics of all batches (``/metrics``): totals by state, endpoint and error, batch states,
events and duration histograms, summed by the database."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Float,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    text,
    type_coerce,
)
from sqlalchemy.orm import Session

from jobs.models import Batch, BatchState, Job, JobEvent, Money
from jobs.states import JobState
from jobs.store.core import _JOBS, _prepared
from jobs.store.money import reserved_usd, spent_usd, wasted_usd

#: A job's ``state`` is terminal, in SQL: the literal list of :data:`FINISHED_EVENTS` as well.
_TERMINAL_VALUES = tuple(sorted(s.value for s in JobState if s.terminal))


@dataclass(frozen=True, slots=True)
class MetricsScope:
    """Which jobs a ``/metrics`` aggregate (:func:`job_totals`, :func:`duration_buckets`) reads,
    by when they finished (``finished_at``), so that a scrape need not read every job ever stored
    (:class:`jobs.metrics.FinishedTotals` keeps the sums of the jobs finished long enough ago):

    * ``sealed``: the jobs in a terminal state that finished before ``until`` (or hold no
      ``finished_at``: rows stored before it was kept) — one full pass, when the sums are built;
    * ``finished``: the jobs in a terminal state that finished at ``since`` or later (and before
      ``until`` when given) — a range of ``ix_jobs_finished_at``;
    * ``unfinished``: the jobs in any other state — ``ix_jobs_state_order``.

    ``sealed`` until ``T``, ``finished`` since ``T`` and ``unfinished`` are every job, each once.
    """

    kind: Literal["sealed", "finished", "unfinished"]
    since: datetime | None = None
    until: datetime | None = None


def _metrics_terms(scope: MetricsScope | None) -> list[ColumnElement[bool]]:
    """The WHERE terms of ``scope`` (None: none), with the bound parameters ``m_since`` and
    ``m_until``: plain terms on the jobs table that an index answers."""
    if scope is None:
        return []
    terminal = Job.state.in_([JobState(v) for v in _TERMINAL_VALUES])
    since = bindparam("m_since", type_=_JOBS.c.finished_at.type)
    until = bindparam("m_until", type_=_JOBS.c.finished_at.type)
    if scope.kind == "sealed":
        return [terminal, or_(Job.finished_at < until, Job.finished_at.is_(None))]
    if scope.kind == "finished":
        return [terminal, Job.finished_at >= since, *([Job.finished_at < until] if scope.until else [])]
    if scope.kind == "unfinished":
        return [Job.state.in_([s for s in JobState if not s.terminal])]
    raise ValueError(f"unknown metrics scope {scope.kind!r}")


def _metrics_key(scope: MetricsScope | None) -> tuple[Any, ...]:
    """What tells apart the statements of ``scope`` (:func:`_prepared`)."""
    return ("all",) if scope is None else (scope.kind, scope.until is not None)


def _metrics_params(scope: MetricsScope | None) -> dict[str, Any]:
    if scope is None:
        return {}
    return {"m_since": scope.since, "m_until": scope.until}


#: The events of jobs that were in a terminal state (``from_state``): a job leaving one
#: (:func:`adopt_late_proof`, :func:`adopt_own_proof`, :func:`adopt_cancelled_proof`) or a note
#: on a finished job's books (:func:`note_duplicate_charge`, :func:`note_request`). Every change
#: of a finished job writes one; the partial index ``ix_job_events_from_finished`` holds them.
FINISHED_EVENTS = "from_state IN (" + ", ".join(f"'{v}'" for v in _TERMINAL_VALUES) + ")"


def count_finished_changes(session: Session) -> int:
    """How many times a finished job changed (:data:`FINISHED_EVENTS`): it grows with every
    change of a finished job, whichever process made it and whenever it commits. Written as the
    partial index's own literal condition, so that SQLite uses the index too."""
    query = select(func.count()).select_from(JobEvent).where(text(FINISHED_EVENTS))
    return int(session.scalar(query) or 0)


@dataclass(frozen=True, slots=True)
class JobTotals:
    """Sums over the jobs of one ``(state, endpoint, error_type)``, every batch: what ``/metrics``
    publishes (:mod:`jobs.metrics`). Money as :class:`BatchMoney` and :class:`BatchCost` define it,
    over the batches sent to fal only: a simulation's money is made up."""

    state: JobState
    endpoint: str
    error_type: str | None
    jobs: int
    attempts: int
    retries: int
    possible_duplicate_charges: int
    confirmed_duplicate_charges: int
    estimated_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal
    wasted_usd: Decimal


#: A job's attempts as ``/metrics`` counts them, in SQL: every request sent, but not the attempt a
#: ``submitting`` job claimed and may still give back (:func:`jobs.store.give_back`,
#: ``fail_unsent`` take it off ``attempts`` again): it counts once it leaves ``submitting``
#: otherwise. So the sum only grows. Was ``attempts - unstarted_requests``: a window's end that
#: requeued a request fal had not started added to ``unstarted_requests`` (the sum fell, then rose
#: as the job was sent again), and a claim given back took off what its claim had added, so
#: ``wanbatch_submits_total`` went down and Prometheus saw counter resets. A request a window's
#: end ended unstarted was sent: it is counted (what ``WANBATCH_MAX_ATTEMPTS`` counts is another
#: matter, ``Job.counted_attempts``).
SENT_ATTEMPTS: ColumnElement[int] = Job.attempts - case(
    ((Job.state == JobState.SUBMITTING) & (Job.attempts > 0), 1), else_=0
)

#: A job's possible duplicate charges as ``/metrics`` counts them, in SQL: every resend of an
#: unknown submit that was sent, but not the one a ``submitting`` job recorded as sent and may
#: still give back. :func:`jobs.store.record_send` counts a resend in
#: ``possible_duplicate_charges`` as its POST is recorded, and :func:`jobs.store.give_back` (fal's
#: 429, a POST that never left) or ``fail_unsent`` uncounts it: the stored count falls by one,
#: which ``wanbatch_possible_duplicate_charges_total`` showed as a counter reset. Counted once the
#: job leaves ``submitting`` otherwise, as :data:`SENT_ATTEMPTS` counts its attempt: so the sum
#: only grows. The condition is the one the uncounting applies (``_RESEND_UNSENT``).
SENT_DUPLICATES: ColumnElement[int] = Job.possible_duplicate_charges - case(
    (
        (Job.state == JobState.SUBMITTING)
        & (Job.resend_attempt == Job.attempts)
        & Job.submitted_input.is_not(None)
        & (Job.possible_duplicate_charges > 0),
        1,
    ),
    else_=0,
)


def job_totals(session: Session, scope: MetricsScope | None = None) -> list[JobTotals]:
    """Every job's numbers, summed per ``(state, endpoint, error_type)`` in one pass over the table
    (or over the jobs of ``scope`` only: :class:`MetricsScope`).

    ``attempts``: the submissions of the jobs, every request sent to fal (:data:`SENT_ATTEMPTS`);
    ``retries``: those beyond each job's first; ``possible_duplicate_charges``: the resends of
    unknown submits sent (:data:`SENT_DUPLICATES`). All only grow, as counters must.
    """
    zero = type_coerce(0, Money())

    def build() -> Any:
        paid = Batch.simulated.is_(False)
        counted = SENT_ATTEMPTS
        return (
            select(
                Job.state,
                Job.endpoint,
                Job.error_type,
                func.count(),
                func.coalesce(func.sum(counted), 0),
                func.coalesce(func.sum(case((counted > 1, counted - 1), else_=0)), 0),
                func.coalesce(func.sum(SENT_DUPLICATES), 0),
                func.coalesce(func.sum(Job.confirmed_duplicate_charges), 0),
                *(
                    func.coalesce(func.sum(case((paid, money), else_=zero)), zero)
                    for money in (
                        type_coerce(Job.est_usd, Money()),
                        spent_usd(),
                        reserved_usd(),
                        wasted_usd(),
                    )
                ),
            )
            .join(Batch, Batch.id == Job.batch_id)
            .where(*_metrics_terms(scope))
            .group_by(Job.state, Job.endpoint, Job.error_type)
        )

    return [
        JobTotals(
            state=JobState(row[0]),
            endpoint=str(row[1]),
            error_type=row[2],
            jobs=int(row[3]),
            attempts=int(row[4]),
            retries=int(row[5]),
            possible_duplicate_charges=int(row[6]),
            confirmed_duplicate_charges=int(row[7]),
            estimated_usd=row[8],
            spent_usd=row[9],
            reserved_usd=row[10],
            wasted_usd=row[11],
        )
        for row in session.execute(
            _prepared(("job_totals", *_metrics_key(scope)), build), _metrics_params(scope)
        )
    ]


def batch_states(session: Session) -> dict[str, int]:
    """Batches ``active``, ``paused`` (by fal's refusal, a budget, or ``wanbatch pause``) and
    ``cancelled``: every state present, 0 when none."""
    out = {state.value: 0 for state in BatchState}
    grouped = select(Batch.state, Batch.paused_by_user, func.count()).group_by(
        Batch.state, Batch.paused_by_user
    )
    for state, by_user, n in session.execute(grouped):
        name = BatchState(state).value
        if name == BatchState.ACTIVE.value and by_user:
            name = BatchState.PAUSED.value
        out[name] += int(n)
    return out


def count_events_into(session: Session, state: JobState) -> int:
    """How many times any job moved into ``state`` (its history, e.g. submits of unknown outcome).

    The state is written into the SQL as a literal, not a parameter, so that a partial index
    ``ON job_events (…) WHERE to_state = '<state>'`` can answer it without reading the table.
    """
    into: ColumnElement[str] = literal_column(f"'{JobState(state).value}'")
    query = select(func.count()).select_from(JobEvent).where(JobEvent.to_state == into)
    return int(session.scalar(query) or 0)


def _seconds_between(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds: ``date_part`` (a float; ``extract`` gives a numeric, several
    times slower to compare) on PostgreSQL, Julian days on SQLite."""
    if dialect == "postgresql":
        return func.date_part("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _inference_seconds(dialect: str) -> ColumnElement[Any]:
    """fal's ``metrics.inference_time`` when it is a number; anything else a provider sent is
    skipped, never cast (a bad value must not fail the query). On SQLite a document that is no
    JSON is skipped before ``json_type`` reads it (which would fail the whole query): an
    ``Infinity`` that earlier versions stored from a ``1e999`` in a fal answer."""
    if dialect == "postgresql":
        is_number = func.jsonb_typeof(Job.provider_metrics.op("->")("inference_time")) == "number"
        number: ColumnElement[Any] = Job.provider_metrics.op("->>")("inference_time").cast(Float)
        return case((is_number, number), else_=None)
    is_json = func.json_valid(Job.provider_metrics) == 1
    is_number = func.json_type(Job.provider_metrics, "$.inference_time").in_(["integer", "real"])
    number = func.json_extract(Job.provider_metrics, "$.inference_time")
    return case((~is_json, None), (is_number, number), else_=None)


#: What each duration histogram measures per job, in SQL (NULL: the job is not counted):
#:
#: * ``wait``: ``created_at`` → ``submitted_at``: how long a job waited on this side before its
#:   (last) submit — limits, budget, schedule, retry backoff;
#: * ``fal``: ``submitted_at`` → ``completed_at``: the request's time at fal, its queue and the
#:   model run, as seen from here (without webhooks, up to a poll interval more);
#: * ``inference``: fal's own ``inference_time`` of the request (the model's time);
#: * ``download``: ``completed_at`` → ``finished_at`` of succeeded jobs that were sent: fetching
#:   the result and the video, checking and storing it.
DURATIONS: dict[str, Callable[[str], ColumnElement[Any]]] = {
    "wait": lambda dialect: _seconds_between(dialect, Job.created_at, Job.submitted_at),
    "fal": lambda dialect: _seconds_between(dialect, Job.submitted_at, Job.completed_at),
    "inference": _inference_seconds,
    "download": lambda dialect: case(
        (
            (Job.state == JobState.SUCCEEDED) & Job.reused_from.is_(None),
            _seconds_between(dialect, Job.completed_at, Job.finished_at),
        ),
        else_=None,
    ),
}


def _bucket(dialect: str, seconds: ColumnElement[Any], bounds: Sequence[float]) -> ColumnElement[Any]:
    """The index of the first of ``bounds`` (ascending) that ``seconds`` is at most
    (``len(bounds)``: beyond the last), in SQL.

    PostgreSQL's ``width_bucket(x, thresholds)`` (a binary search) counts the thresholds ``<= x``,
    where Prometheus' ``le`` buckets want those ``< x`` (a value equal to a bound belongs to it).
    Negated, ``width_bucket(-x, -bounds reversed)`` counts the bounds ``>= x``, and what remains
    of ``len(bounds)`` is the count ``< x``: the index wanted. SQLite has no ``width_bucket``: a
    ``CASE`` down the bounds.
    """
    if dialect == "postgresql":
        negated = ",".join(repr(-float(bound)) for bound in reversed(bounds))
        return len(bounds) - func.width_bucket(-seconds, literal_column(f"'{{{negated}}}'::float8[]"))
    return case(*((seconds <= bound, index) for index, bound in enumerate(bounds)), else_=len(bounds))


def duration_buckets(
    session: Session, name: str, bounds: Sequence[float], scope: MetricsScope | None = None
) -> list[tuple[int, int, float]]:
    """``(bucket index, jobs, sum of their durations)`` per non-empty bucket of the duration
    ``name`` (a key of :data:`DURATIONS`; the index as :func:`duration_histogram` counts them),
    over every job or the jobs of ``scope`` (:class:`MetricsScope`). One ``GROUP BY``: the
    database returns a row per bucket, never a row per job. Negative durations (clocks that
    stepped back) are left out.

    Only jobs in a terminal state are counted (an ``unfinished`` scope reads nothing): an
    unfinished job's times still move — a retry clears ``completed_at`` and a new submit moves
    ``submitted_at`` — so counting it made the histograms' buckets go down, which Prometheus
    reads as a reset. A finished job's times are sealed: it is counted once, as it finishes."""
    if scope is not None and scope.kind == "unfinished":
        return []  # finished jobs only (see above): nothing to read
    dialect = session.get_bind().dialect.name
    seconds = DURATIONS[name](dialect)
    bucket = _bucket(dialect, seconds, bounds)
    finished = [Job.state.in_([JobState(v) for v in _TERMINAL_VALUES])] if scope is None else []
    query = (
        select(bucket.label("bucket"), func.count(), func.sum(seconds))
        .where(seconds.is_not(None), seconds >= 0, *finished, *_metrics_terms(scope))
        .group_by(literal_column("bucket"))
    )
    return [
        (int(index), int(n), float(seconds_sum or 0.0))
        for index, n, seconds_sum in session.execute(query, _metrics_params(scope))
    ]


def duration_histogram(
    session: Session, name: str, bounds: Sequence[float], scope: MetricsScope | None = None
) -> tuple[list[int], float]:
    """Jobs per bucket of the duration ``name`` (a key of :data:`DURATIONS`) and the durations' sum
    (of the jobs of ``scope`` only, when given: :class:`MetricsScope`).

    ``counts[i]`` jobs took at most ``bounds[i]`` seconds and more than the bound before it (not
    cumulative); the last entry counts those beyond every bound (:func:`duration_buckets`).
    """
    counts = [0] * (len(bounds) + 1)
    total = 0.0
    for index, n, seconds_sum in duration_buckets(session, name, bounds, scope):
        counts[index] += n
        total += seconds_sum
    return counts, total
