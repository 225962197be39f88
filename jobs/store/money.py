"""Money: what a batch (and a job) is estimated, spent, committed, reserved and wasted, and
the day's committed money the daily budget counts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ColumnElement,
    bindparam,
    case,
    func,
    literal_column,
    select,
    text,
    type_coerce,
    union_all,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter

from jobs.models import NOT_IN_MANIFEST, Batch, Job, Money
from jobs.money import BUDGET_ERRORS, DaySpender
from jobs.states import AT_PROVIDER_STATES, JobState
from jobs.store.core import _paid, _prepared, _run
from jobs.store.reading import _rows_bounded
from jobs.store.transitions import _TOTALS, utc_day


def committed_usd_since(session: Session, since: datetime) -> Decimal:
    """USD committed across every batch sent to fal since ``since`` (the daily budget): what
    every job fal holds or may hold now commits (:func:`committed_usd`, as the batch cap counts
    it: its estimate plus what its earlier attempts were, or may have been, billed), plus what
    jobs submitted since then were (or may have been) billed. Simulations are left out
    (:func:`_paid`)."""
    zero = type_coerce(0, Money())
    reserved = session.scalar(
        select(func.coalesce(func.sum(committed_usd()), zero)).where(
            Job.state.in_(list(AT_PROVIDER_STATES)), _paid(Job.batch_id)
        )
    )
    spent = session.scalar(
        select(func.coalesce(func.sum(spent_usd()), zero)).where(
            Job.submitted_at >= since, Job.state.not_in(list(AT_PROVIDER_STATES)), _paid(Job.batch_id)
        )
    )
    return Decimal(reserved or 0) + Decimal(spent or 0)


def committed_usd_today(session: Session, now: datetime) -> Decimal:
    """:func:`committed_usd_since` the UTC midnight before ``now`` (the daily budget), read
    without summing every job ever stored: finished jobs from :class:`BatchTotals` (the rows of
    this day), the unfinished ones fal holds or has billed by index. Dispatch asks it on every
    round while ``WANBATCH_DAILY_BUDGET_USD`` is set. Simulations are left out (:func:`_paid`)."""
    since = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

    def build() -> Any:
        zero = type_coerce(0, Money())
        after: BindParameter[datetime] = bindparam("since", type_=Job.submitted_at.type)
        finished = (
            select(func.sum(type_coerce(_TOTALS.c.finished_usd, Money())))
            .where(_TOTALS.c.day >= bindparam("day"), _paid(_TOTALS.c.batch_id))
            .scalar_subquery()
        )
        reserved = (
            select(func.sum(committed_usd()))
            .where(Job.state.in_(list(AT_PROVIDER_STATES)), _paid(Job.batch_id))
            .scalar_subquery()
        )
        unfinished = (
            select(func.sum(spent_usd()))
            .where(
                Job.state.in_([JobState.DOWNLOADING, JobState.RETRY_WAIT]),
                Job.submitted_at >= after,
                _paid(Job.batch_id),
            )
            .scalar_subquery()
        )
        parked = (
            select(func.sum(_parked_usd()))
            .where(_PENDING_BILLED, Job.submitted_at >= after, _paid(Job.batch_id))
            .scalar_subquery()
        )
        return select(
            *(func.coalesce(type_coerce(q, Money()), zero) for q in (finished, reserved, unfinished, parked))
        )

    params = {"day": utc_day(since), "since": since}
    row: Any = _run(session, _prepared(("committed_today",), build), params).one()
    return sum((Decimal(v) for v in row), Decimal(0))


def committed_usd_today_by_batch(session: Session, now: datetime) -> list[DaySpender]:
    """:func:`committed_usd_today` by batch, in one grouped query: each batch with money
    counted today (its name beside its id), the largest first. They sum to
    :func:`committed_usd_today`: the same four parts, each grouped by batch.

    Read only to say whose spending a daily cap counted (a refusal's ``error``: dispatch asks
    it once in a round that refuses a job, never per job nor per round; ``validate`` and
    ``estimate``'s warning): the cap is summed over every batch of the database, and a user
    whose jobs it cancelled was told only a total, mostly other people's."""
    since = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

    def build() -> Any:
        after: BindParameter[datetime] = bindparam("since", type_=Job.submitted_at.type)
        parts = [
            select(_TOTALS.c.batch_id, func.sum(type_coerce(_TOTALS.c.finished_usd, Money())).label("usd"))
            .where(_TOTALS.c.day >= bindparam("day"), _paid(_TOTALS.c.batch_id))
            .group_by(_TOTALS.c.batch_id),
            select(Job.batch_id, func.sum(committed_usd()).label("usd"))
            .where(Job.state.in_(list(AT_PROVIDER_STATES)), _paid(Job.batch_id))
            .group_by(Job.batch_id),
            select(Job.batch_id, func.sum(spent_usd()).label("usd"))
            .where(
                Job.state.in_([JobState.DOWNLOADING, JobState.RETRY_WAIT]),
                Job.submitted_at >= after,
                _paid(Job.batch_id),
            )
            .group_by(Job.batch_id),
            select(Job.batch_id, func.sum(_parked_usd()).label("usd"))
            .where(_PENDING_BILLED, Job.submitted_at >= after, _paid(Job.batch_id))
            .group_by(Job.batch_id),
        ]
        each = union_all(*parts).subquery("each")
        usd = type_coerce(func.sum(each.c.usd), Money())
        return (
            select(Batch.id, Batch.name, usd)
            .join(each, each.c.batch_id == Batch.id)
            .group_by(Batch.id, Batch.name)
            .having(func.sum(each.c.usd) > literal_column("0"))
            .order_by(func.sum(each.c.usd).desc(), Batch.name)
        )

    params = {"day": utc_day(since), "since": since}
    rows = _run(session, _prepared(("committed_today_by_batch",), build), params).all()
    return [DaySpender(batch_id=r[0], name=r[1], usd=Decimal(r[2])) for r in rows]


@dataclass(frozen=True, slots=True)
class BatchMoney:
    """A batch's money, all exact Decimals in USD.

    * ``estimated_usd``: the sum of every job's estimate (what the whole batch should cost).
    * ``spent_usd``: what fal has billed or will bill for work it finished: what every job's
      attempts were billed (its actual cost); for a job in ``downloading`` that plus the
      estimate of the attempt fal just finished (its bill is written when the download ends);
      for a ``succeeded`` job with no recorded cost, its estimate.
    * ``reserved_usd``: estimates of jobs fal holds or may hold right now (submitting,
      submit_unknown, queued, running, cancelling): money that may still be charged.
    * ``committed_usd`` (= spent + reserved) is what a budget cap is checked against.
    * ``possible_duplicate_charges``: resubmissions after an ambiguous submit (maybe billed twice).
    * ``confirmed_duplicate_charges``: extra requests fal proved it ran (billed): by a signed
      webhook, or by a submit's answer that came after the job had moved on.
    * ``possibly_billed_usd``: the part of ``spent_usd`` that submits of unknown outcome (and
      requests fal lost after they started running, or left at fal unfollowed) may have cost
      (``Job.ambiguous_usd``): counted against the budget, shown apart.
    """

    estimated_usd: Decimal
    spent_usd: Decimal
    reserved_usd: Decimal
    possible_duplicate_charges: int
    confirmed_duplicate_charges: int = 0
    possibly_billed_usd: Decimal = Decimal(0)

    @property
    def committed_usd(self) -> Decimal:
        return self.spent_usd + self.reserved_usd


def estimated_usd() -> ColumnElement[Decimal]:
    """One job's share of ``estimated_usd`` (:class:`BatchMoney`): its estimate, none for a job
    its manifest no longer has that was dropped, never sent (``error_type``
    :data:`~jobs.models.NOT_IN_MANIFEST`: it never will be, unless the manifest has it again).
    Summed by :func:`batch_money`, :func:`batch_estimated_usd` and ``status`` (:mod:`jobs.listing`)."""
    zero = type_coerce(0, Money())
    return type_coerce(case((Job.error_type == NOT_IN_MANIFEST, zero), else_=Job.est_usd), Money())


def spent_usd() -> ColumnElement[Decimal]:
    """One job's share of ``spent_usd`` (:class:`BatchMoney`), :func:`finished_usd` in SQL:
    summed per batch by :func:`batch_money` and the budget checks (:func:`batch_committed_usd`,
    the daily cap's :func:`committed_usd_today`), per state by ``status``, the dashboard and
    ``/metrics`` (:mod:`jobs.listing`).

    A ``downloading`` job counts what its earlier attempts cost (``actual_usd``) plus its
    estimate: fal finished the current attempt, but its bill is written only when the download
    ends. Counting ``actual_usd`` alone there let a retried job whose failed attempt cost
    nothing count $0 while its paid video was fetched, and a budget cap let one more job in."""
    actual = func.coalesce(Job.actual_usd, type_coerce(0, Money()))
    billed = case(
        (Job.state == JobState.DOWNLOADING, actual + Job.est_usd),
        (Job.state == JobState.SUCCEEDED, func.coalesce(Job.actual_usd, Job.est_usd)),
        else_=actual,
    )
    return type_coerce(billed + Job.ambiguous_usd, Money())


def committed_usd() -> ColumnElement[Decimal]:
    """What one job commits against a budget cap: ``spent_usd() + reserved_usd()`` (its share of
    :attr:`BatchMoney.committed_usd`). The one definition both caps sum — a batch's
    (:func:`batch_committed_usd`) and the day's (:func:`committed_usd_today`,
    :func:`committed_usd_since`) — so that a job counts, whatever its state, at least what its
    earlier attempts were (or may have been) billed plus its current attempt's estimate. A job
    sent again to fal after a billed attempt (a window closed on it running, a 422 whose upload
    was gone) used to count only its estimate in the day's sum, which let one more job past
    ``WANBATCH_DAILY_BUDGET_USD``."""
    return type_coerce(spent_usd() + reserved_usd(), Money())


def _parked_usd() -> ColumnElement[Decimal]:
    """A pending job's billed money: what earlier attempts were billed, or may have been."""
    return type_coerce(func.coalesce(Job.actual_usd, type_coerce(0, Money())) + Job.ambiguous_usd, Money())


def reserved_usd() -> ColumnElement[Decimal]:
    """One job's share of ``reserved_usd`` (:class:`BatchMoney`): its estimate while fal may hold it."""
    zero = type_coerce(0, Money())
    return type_coerce(case((Job.state.in_(list(AT_PROVIDER_STATES)), Job.est_usd), else_=zero), Money())


def batch_money(session: Session, batch_id: str) -> BatchMoney:
    """Estimated, spent and reserved USD for a batch (see :class:`BatchMoney` for definitions)."""

    def build() -> Any:
        zero = type_coerce(0, Money())
        return select(
            func.coalesce(func.sum(estimated_usd()), zero),
            func.coalesce(func.sum(spent_usd()), zero),
            func.coalesce(func.sum(reserved_usd()), zero),
            func.coalesce(func.sum(Job.possible_duplicate_charges), 0),
            func.coalesce(func.sum(Job.confirmed_duplicate_charges), 0),
            func.coalesce(func.sum(type_coerce(Job.ambiguous_usd, Money())), zero),
        ).where(Job.batch_id == bindparam("batch_id"))

    row: Any = _run(session, _prepared(("batch_money",), build), {"batch_id": batch_id}).one()
    return BatchMoney(
        estimated_usd=row[0],
        spent_usd=row[1],
        reserved_usd=row[2],
        possible_duplicate_charges=int(row[3]),
        confirmed_duplicate_charges=int(row[4]),
        possibly_billed_usd=row[5],
    )


#: ``ix_jobs_pending_billed``'s condition, word for word: SQLite uses a partial index only for
#: a query whose WHERE repeats the index's terms (https://sqlite.org/partialindex.html).
_PENDING_BILLED = text("state = 'pending' AND (actual_usd IS NOT NULL OR ambiguous_usd > 0)")


def batch_committed_usd(session: Session, batch_id: str) -> Decimal:
    """``batch_money(...).committed_usd``, read without summing the batch's finished and
    never-billed jobs: the budget check runs on every dispatch round, and a batch may hold
    100,000 jobs. Finished jobs come from :class:`BatchTotals`; the unfinished ones fal may hold
    or has billed are few and found by index (``ix_jobs_batch_id_state_order``, and
    ``ix_jobs_pending_billed`` for pending jobs an earlier attempt billed). A test keeps it
    equal to :func:`batch_money`'s sum through every kind of move."""

    return _summed_by_totals(session, batch_id, "batch_committed", committed_usd)


def lineage_committed_usd(session: Session, batch_id: str) -> Decimal:
    """What ``batch_id`` and its reruns (every generation, :attr:`Batch.parent_batch_id`) have
    committed together (:func:`batch_committed_usd` of each): the money a new rerun of it must
    leave room for under the cap its user set (``rerun``'s default cap). Each rerun had a cap
    of its own, so the batch's alone let a lineage spend its cap once per rerun."""
    total = Decimal(0)
    todo, seen = [batch_id], {batch_id}  # a chain edited by hand into a cycle is walked once
    while todo:
        current = todo.pop()
        total += batch_committed_usd(session, current)
        for child in session.scalars(select(Batch.id).where(Batch.parent_batch_id == current)):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return total


def _summed_by_totals(
    session: Session, batch_id: str, key: str, unfinished_usd: Callable[[], ColumnElement[Decimal]]
) -> Decimal:
    """A sum of money over every job of a batch, read without summing its finished jobs: their
    share from :class:`BatchTotals`, ``unfinished_usd`` over the unfinished jobs that are not
    ``pending`` (found by index), and what pending jobs were billed before (a partial index).
    ``key`` names the kept statement."""

    def build() -> Any:
        zero = type_coerce(0, Money())
        batch: BindParameter[str] = bindparam("batch_id")
        unfinished = [s for s in JobState if not s.terminal and s != JobState.PENDING]
        finished = (
            select(func.sum(type_coerce(_TOTALS.c.finished_usd, Money())))
            .where(_TOTALS.c.batch_id == batch)
            .scalar_subquery()
        )
        live = (
            select(func.coalesce(func.sum(unfinished_usd()), zero))
            .where(Job.batch_id == batch, Job.state.in_(unfinished))
            .scalar_subquery()
        )
        parked = (
            select(func.coalesce(func.sum(_parked_usd()), zero))
            .where(Job.batch_id == batch, _PENDING_BILLED)
            .scalar_subquery()
        )
        return select(func.coalesce(type_coerce(finished, Money()), zero), live, parked)

    row: Any = _run(session, _prepared((key,), build), {"batch_id": batch_id}).one()
    return Decimal(row[0]) + Decimal(row[1]) + Decimal(row[2])


def batch_spent_usd(session: Session, batch_id: str) -> Decimal:
    """``batch_money(...).spent_usd``, read like :func:`batch_committed_usd`: the finished jobs'
    money from :class:`BatchTotals`, the few unfinished ones by index. ``run``'s progress line
    shows it every second; summing a 20,000-job batch for it cost 19 ms of CPU each time. The
    tests that keep the committed figure equal to the full sum check this one too."""
    return _summed_by_totals(session, batch_id, "batch_spent", spent_usd)


def batch_estimated_usd(session: Session, batch_id: str) -> Decimal:
    """The sum of the batch's estimates (``batch_money(...).estimated_usd``) alone."""

    def build() -> Any:
        zero = type_coerce(0, Money())
        total = func.coalesce(func.sum(estimated_usd()), zero)
        return select(total).where(Job.batch_id == bindparam("batch_id"))

    query = _prepared(("batch_estimated",), build)
    return Decimal(_run(session, query, {"batch_id": batch_id}).scalar())


def unsent_estimate(session: Session, batch_id: str) -> tuple[int, Decimal]:
    """The batch's jobs a dispatch round would still send (``pending``, ``retry_wait``) and the
    sum of their estimates: what sending them reserves on top of what the day's cap already
    counts (:func:`committed_usd_today`, in which the batch's jobs sent today are). For
    ``submit``'s daily-cap warning (:func:`jobs.batches.submit_manifest`): a batch submitted or
    run again weighs these, not its whole manifest, whose sent jobs the day counts already."""

    def build() -> Any:
        zero = type_coerce(0, Money())
        total = func.coalesce(func.sum(Job.est_usd), zero)
        return select(func.count(), total).where(
            Job.batch_id == bindparam("batch_id"),
            Job.state.in_([JobState.PENDING, JobState.RETRY_WAIT]),
        )

    row: Any = _run(session, _prepared(("unsent_estimate",), build), {"batch_id": batch_id}).one()
    return int(row[0]), Decimal(row[1])


@dataclass(frozen=True, slots=True)
class BatchCost:
    """The short form of the cost report (``jobs.cost``) that ``status`` shows.

    ``actual_usd``: what the provider billed, per the billing rules, over every attempt.
    ``wasted_usd``: billed money that bought no output (failed or cancelled jobs, and earlier
    attempts of jobs that succeeded). ``cancelled_for_budget``: jobs a budget cap stopped.
    """

    actual_usd: Decimal
    wasted_usd: Decimal
    cancelled_for_budget: int


def wasted_usd() -> ColumnElement[Decimal]:
    """One job's share of ``wasted_usd`` (:class:`BatchCost`): summed per batch by
    :func:`batch_cost`, over every job by ``/metrics`` (:mod:`jobs.metrics`)."""
    zero = type_coerce(0, Money())
    actual = func.coalesce(Job.actual_usd, zero)
    wasted = case(
        (Job.state.in_([JobState.FAILED, JobState.CANCELLED]), actual),
        (
            (Job.state == JobState.SUCCEEDED) & (actual > Job.est_usd),
            type_coerce(actual - Job.est_usd, Money()),
        ),
        else_=zero,
    )
    return type_coerce(wasted, Money())


def batch_cost(session: Session, batch_id: str) -> BatchCost:
    """Actual and wasted USD and budget cancellations of a batch, in one query."""
    zero = type_coerce(0, Money())
    actual = func.coalesce(Job.actual_usd, zero)
    budget = case(((Job.state == JobState.CANCELLED) & Job.error_type.in_(BUDGET_ERRORS), 1), else_=0)
    row = session.execute(
        select(
            func.coalesce(func.sum(type_coerce(actual, Money())), zero),
            func.coalesce(func.sum(wasted_usd()), zero),
            func.coalesce(func.sum(budget), 0),
        ).where(Job.batch_id == batch_id)
    ).one()
    return BatchCost(actual_usd=row[0], wasted_usd=row[1], cancelled_for_budget=int(row[2]))


def count_media_mismatches(session: Session, batch_id: str) -> int:
    """Jobs of the batch whose video did not match the request (``media_mismatch`` set): shown
    by ``status`` and ``cost`` so a flagged clip is seen before it is used."""
    count = session.execute(
        select(func.count()).where(Job.batch_id == batch_id, Job.media_mismatch.is_not(None))
    ).scalar_one()
    return int(count)


@dataclass(frozen=True, slots=True)
class JobMoney:
    """One job's money, as the cost report (``jobs.cost``) adds it up."""

    endpoint: str
    input: dict[str, Any]
    state: JobState
    error_type: str | None
    est_usd: Decimal
    est_units: Decimal
    actual_usd: Decimal | None
    actual_units: Decimal | None
    possible_duplicate_charges: int
    #: What its submits of unknown outcome may have cost (``Job.ambiguous_usd``).
    ambiguous_usd: Decimal = Decimal(0)
    #: Extra requests fal proved it ran (billed in ``actual_usd`` when a success).
    confirmed_duplicate_charges: int = 0
    #: When its last request was sent; None when none ever was (:func:`unsent_kind`).
    submitted_at: datetime | None = None


def job_money(session: Session, batch_id: str) -> Iterator[JobMoney]:
    """The money of every job of a batch, streamed (only the columns the cost report needs) in
    pages bounded in bytes (the input, read for its resolution, may hold an inline image)."""
    columns = (
        Job.endpoint,
        Job.input,
        Job.state,
        Job.error_type,
        Job.est_usd,
        Job.est_billing_units,
        Job.actual_usd,
        Job.actual_billing_units,
        Job.possible_duplicate_charges,
        Job.ambiguous_usd,
        Job.confirmed_duplicate_charges,
        Job.submitted_at,
    )
    for row in _rows_bounded(session, columns, [Job.batch_id == batch_id], [Job.input]):
        yield JobMoney(
            endpoint=row.endpoint,
            input=row.input or {},
            state=JobState(row.state),
            error_type=row.error_type,
            est_usd=row.est_usd,
            est_units=row.est_billing_units,
            actual_usd=row.actual_usd,
            actual_units=row.actual_billing_units,
            possible_duplicate_charges=int(row.possible_duplicate_charges or 0),
            ambiguous_usd=row.ambiguous_usd or Decimal(0),
            confirmed_duplicate_charges=int(row.confirmed_duplicate_charges or 0),
            submitted_at=row.submitted_at,
        )
