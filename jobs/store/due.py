"""Which jobs are due (by state, and the retries whose time has come) and which of them a claim
takes first (:func:`_claim_candidates`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.visitors import InternalTraversal

from jobs.models import JOB_RECORD_FIELDS, Batch, BatchState, ClockMark
from jobs.states import AT_PROVIDER_STATES, JobState
from jobs.store.core import _JOBS, _prepared, _run, sent_to_origin


def _due(
    session: Session,
    *,
    record: bool,
    states: Sequence[JobState],
    limit: int,
    now: datetime,
    batch_id: str | None = None,
    batch_ids: Iterable[str] | None = None,
    active_batches_only: bool = False,
    endpoints: Sequence[str] | None = None,
    exclude_ids: Collection[str] = (),
    exclude_batch_ids: Collection[str] = (),
    sent_to: str | None = None,
) -> list[Any]:
    """The oldest ``limit`` due jobs of :func:`claim_jobs`: their sort keys, or (``record``) the
    columns of :class:`~jobs.models.JobRecord`, as rows."""
    if limit <= 0 or not states:
        return []
    wanted: list[str | None] = [batch_id]
    if batch_ids is not None:
        if batch_id is not None:
            raise ValueError("claim_jobs takes batch_id or batch_ids, not both")
        wanted = list(sorted(set(batch_ids) - set(exclude_batch_ids)))
        if not wanted:
            return []
    if batch_id is not None and batch_id in exclude_batch_ids:
        return []
    skip_batches = sorted(exclude_batch_ids) if batch_id is None and batch_ids is None else []
    shape = (
        batch_id is not None or batch_ids is not None,
        active_batches_only,
        endpoints is not None,
        bool(exclude_ids),
        bool(skip_batches),
        sent_to is not None,
    )
    candidates = _prepared(("claim", record, *shape), lambda: _claim_candidates(*shape, record=record))
    params: dict[str, Any] = {
        "now": now,
        "limit": limit,
        "endpoints": list(endpoints or ()),
        "exclude_ids": sorted(exclude_ids),
        "exclude_batch_ids": skip_batches,
        "sent_to": sent_to,
    }
    # One query per (state, batch), each reading the index on (batch_id, state, created_at,
    # item_index, id) — or (state, created_at, …) — in order and stopping at ``limit``; then
    # the oldest of them. One query over all states and batches had to sort every due job:
    # 25 ms per claim at 20,000 pending jobs, and a claim runs on every completion.
    found: list[Any] = []
    for state in states:
        for one_batch in wanted:
            at = {**params, "state": state, "batch_id": one_batch}
            if state == JobState.RETRY_WAIT:
                found += _due_retries(session, at, shape, record=record, candidates=candidates)
            else:
                found += _run(session, candidates, at).all()
    found.sort(key=lambda r: (r.created_at, r.item_index, r.id))
    return found[:limit]


@dataclass(frozen=True, slots=True)
class DueBatch:
    """A batch with jobs to send, as a fair claim (:func:`_due_fairly`) ranks it."""

    id: str
    #: ``priority: low``: its jobs are claimed only when no normal-priority batch's are due.
    low: bool
    #: Its requests at fal now (or being sent): the share of the outstanding cap it holds.
    at_fal: int
    created_at: datetime

    @property
    def first(self) -> tuple[bool, int, datetime, str]:
        """The claim order's key of its first due job (:func:`_share`): no job of it comes earlier."""
        return (self.low, self.at_fal, self.created_at, self.id)


def _due_fairly(
    session: Session,
    *,
    states: Sequence[JobState],
    limit: int,
    now: datetime,
    batch_ids: Iterable[str] | None = None,
    active_batches_only: bool = False,
    endpoints: Sequence[str] | None = None,
    exclude_batch_ids: Collection[str] = (),
) -> list[Any]:
    """The ``limit`` due jobs a dispatch round claims (as :class:`~jobs.models.JobRecord`), shared between the
    batches that have jobs to send (:func:`_share`): normal-priority batches before
    ``priority: low`` ones, and among them the next slot to the batch with the fewest
    requests at fal; within a batch in item order (``created_at``, ``item_index``, ``id``).

    Claimed oldest first across every batch (one walk of the index on ``state, created_at``),
    the batch submitted first took every slot fal freed until its last job was sent: a 10-job
    batch submitted after a 2,000-job one waited for all of it, and a ``priority: low`` batch
    held normal ones back. The batches with jobs to send come from one query on the batches
    (:func:`_due_batches`: one index look per batch with a job ``pending`` or in ``retry_wait``,
    and their requests at fal counted),
    then each batch's due jobs through the index on (``batch_id``, ``state``, ``created_at``,
    …), stopping at ``limit`` — only as many batches as can get a slot. One batch to claim for
    (an embedded ``run``) claims its own jobs as before: nothing to share."""
    if limit <= 0 or not states:
        return []
    common: dict[str, Any] = {
        "record": True,
        "states": states,
        "now": now,
        "active_batches_only": active_batches_only,
        "endpoints": endpoints,
    }
    wanted: list[str] | None = None
    if batch_ids is not None:
        wanted = sorted(set(batch_ids) - set(exclude_batch_ids))
        if len(wanted) <= 1:
            return _due(session, limit=limit, batch_ids=wanted, **common)
    batches = _due_batches(
        session,
        batch_ids=wanted,
        active_only=active_batches_only,
        exclude_batch_ids=() if wanted is not None else exclude_batch_ids,
    )
    return _share(batches, limit, lambda batch: _due(session, limit=limit, batch_id=batch.id, **common))


def _share(batches: Sequence[DueBatch], limit: int, due_of: Callable[[DueBatch], list[Any]]) -> list[Any]:
    """Of the due jobs of ``batches`` (``due_of``: a batch's, in item order), the first
    ``limit`` by (priority, the batch's requests at fal + the job's place among its batch's due
    ones, the batch's age): each slot goes to a normal-priority batch before a low one, and to
    the batch that would hold the fewest slots with it, the older batch on a tie — the cap is
    shared out evenly between the batches with jobs to send, whatever their size or order of
    submission, and a batch's jobs go in item order. A batch is read only if one of its jobs
    can still be among the first ``limit``."""
    ranked: list[tuple[tuple[bool, int, datetime, str], Any]] = []
    for batch in sorted(batches, key=lambda b: b.first):
        if len(ranked) >= limit:
            ranked.sort(key=lambda item: item[0])
            del ranked[limit:]
            if ranked[-1][0] < batch.first:
                break  # neither this batch nor any after it comes before the last one taken
        for place, row in enumerate(due_of(batch)):
            ranked.append(((batch.low, batch.at_fal + place, batch.created_at, batch.id), row))
    ranked.sort(key=lambda item: item[0])
    return [row for _key, row in ranked[:limit]]


_BATCHES = cast(Table, Batch.__table__)


def batches_with_jobs_to_send(session: Session) -> list[DueBatch]:
    """The active batches with a job ``pending`` or in ``retry_wait`` (:func:`_due_batches`),
    with their priority and their requests at fal: those the workers' leader shares the slots
    between (but for the ones held back by a pause or their schedule)."""
    return _due_batches(session, batch_ids=None, active_only=True, exclude_batch_ids=())


def _due_batches(
    session: Session,
    *,
    batch_ids: Sequence[str] | None,
    active_only: bool,
    exclude_batch_ids: Collection[str],
) -> list[DueBatch]:
    """The batches (of ``batch_ids``, None: any; ``active_only``: active ones; not those of
    ``exclude_batch_ids``) with a ``pending`` job or one in ``retry_wait``, with their priority
    and their requests at fal, in one query (:func:`_due_batches_query`). Whether any of their
    jobs is due (a retry's time, a lease, a wait) is the batch's claim's to say."""
    shape = (batch_ids is not None, active_only, bool(exclude_batch_ids))
    dialect = session.get_bind().dialect.name
    query = _prepared(("due-batches", dialect, *shape), lambda: _due_batches_query(dialect, *shape))
    params = {
        "ids": list(batch_ids or ()),
        "skip": sorted(exclude_batch_ids),
        "at_fal": sorted(AT_PROVIDER_STATES, key=lambda state: state.value),
    }
    return [
        DueBatch(str(row.id), row.priority == "low", int(row.at_fal), row.created_at)
        for row in _run(session, query, params)
    ]


#: The jobs of :data:`jobs.models` ``ix_jobs_to_send_batch_id``, its predicate spelled as there:
#: SQLite reads a partial index only for a query that repeats the term literally.
_TO_SEND = text("jobs.state IN ('pending', 'retry_wait')")
#: … and even then, with no statistics (``ANALYZE``) to go by, it read the jobs in those states
#: through ``ix_jobs_state_order`` and sorted their batch ids, every pending job of every batch
#: for each step of the scan (100,000 of them: 6 ms a round): told which index to read.
_SQLITE_TO_SEND = "jobs INDEXED BY ix_jobs_to_send_batch_id"


def _due_batches_query(dialect: str, scoped: bool, active_only: bool, excluding: bool) -> Any:
    """:func:`_due_batches`' query. The batches with a job ``pending`` or in ``retry_wait``
    come from a loose scan of ``ix_jobs_to_send_batch_id`` (a recursive CTE: the first batch
    id, then the first one after it, …), one index look per such batch, whatever the number of
    batches whose jobs are all finished (they stay ``active``, and every batch probed cost a
    round a look); then each one's state, priority and requests at fal. Whether a job of it is
    due is left to its claim: an index look more per batch here, and PostgreSQL read the look
    for ``pending`` jobs through this index, every ``retry_wait`` job of the batch in turn."""
    batch = _BATCHES.c

    def after(previous: Any) -> Any:
        if dialect == "sqlite":  # SQLite, with no statistics, read every pending job instead (below)
            column: ColumnElement[str] = literal_column("jobs.batch_id", type_=_JOBS.c.batch_id.type)
            following = select(column).select_from(text(_SQLITE_TO_SEND)).where(_TO_SEND)
        else:
            column = _JOBS.c.batch_id
            following = select(column).where(_TO_SEND)
        if previous is not None:
            following = following.where(column > previous)
        return following.order_by(column).limit(1).scalar_subquery()

    walk = select(after(None).label("batch_id")).cte("with_jobs_to_send", recursive=True)
    walk = walk.union_all(select(after(walk.c.batch_id)).where(walk.c.batch_id.is_not(None)))

    conditions: list[ColumnElement[bool]] = []
    if scoped:
        conditions.append(batch.id.in_(bindparam("ids", expanding=True)))
    if active_only:
        conditions.append(batch.state == BatchState.ACTIVE)
    if excluding:
        conditions.append(batch.id.not_in(bindparam("skip", expanding=True)))
    at_fal = (
        select(func.count())
        .select_from(_JOBS)
        .where(_JOBS.c.batch_id == batch.id, _JOBS.c.state.in_(bindparam("at_fal", expanding=True)))
        .scalar_subquery()
    )
    return (
        select(batch.id, batch.priority, batch.created_at, at_fal.label("at_fal"))
        .select_from(walk.join(_BATCHES, batch.id == walk.c.batch_id))
        .where(*conditions)
    )


#: Up to how many due ``retry_wait`` jobs (of a batch, or of all) a claim reads through the index
#: on their ``next_attempt_at`` and sorts (:func:`_due_retries`); more, and it reads them in
#: claim order instead, as every other state, stopping at its limit.
FEW_DUE_RETRIES = 500


def _due_retries(
    session: Session, params: dict[str, Any], shape: tuple[bool, ...], *, record: bool, candidates: Any
) -> list[Any]:
    """The oldest ``limit`` due ``retry_wait`` jobs of one batch (or of all): the candidate rows
    of :func:`_due`, read through their ``next_attempt_at`` when few are due.

    The jobs waiting out their backoff are not due, and a 5xx outage leaves thousands of them:
    read in claim order (``created_at``, as every other state), every one of them came before
    the query could stop — 12 ms per claim at 8,000 of them, on every completion. The index on
    (``batch_id``, ``state``, ``next_attempt_at``) — or (``state``, ``next_attempt_at``) — holds
    the due ones apart: first how many (at most :data:`FEW_DUE_RETRIES`, on the index alone),
    then, when there are fewer, those due at once (``next_attempt_at`` NULL) and those whose
    moment has come, each read through that index and sorted into claim order. When there are
    more (an outage over: all due at once), the order-walking query finds ``limit`` due ones
    near its start.
    """
    unset, passed = _run(
        session,
        _prepared(("due-retries", shape[0]), lambda: _count_due(shape[0])),
        {**params, "few": FEW_DUE_RETRIES},
    ).one()
    if not unset and not passed:
        return []
    if unset >= FEW_DUE_RETRIES or passed >= FEW_DUE_RETRIES:
        return list(_run(session, candidates, params).all())
    found: list[Any] = []
    for due, count in zip(_DUE, (unset, passed), strict=True):
        if count:
            query = _prepared(
                ("claim", record, *shape, due),
                functools.partial(_claim_candidates, *shape, record=record, due=due),
            )
            found += _run(session, query, params).all()
    return found


#: The two ways a ``retry_wait`` job is due (:func:`_due_retry_moment`).
_DUE = ("unset", "passed")


#: ``retry_wait`` as the partial indexes on ``next_attempt_at`` (:data:`jobs.models.WAITING_STATES`)
#: need it: a literal, not a parameter. SQLite would match a parameter bound to it as well (and
#: prepare the statement again for another value), but PostgreSQL's generic plan of a prepared
#: statement (psycopg prepares one run five times) cannot prove a partial index's predicate.
_RETRY_WAITING = _JOBS.c.state == literal_column(f"'{JobState.RETRY_WAIT.value}'", type_=_JOBS.c.state.type)


def _due_retry_moment(due: str) -> ColumnElement[bool]:
    """``retry_wait`` jobs due at once (``unset``: no ``next_attempt_at``) or whose moment has
    come (``passed``), as the index on ``next_attempt_at`` finds them (one equality, or one
    range: not the two of them or-ed, which no index reads)."""
    if due == "unset":
        return _JOBS.c.next_attempt_at.is_(None)
    return _JOBS.c.next_attempt_at <= bindparam("now")


def _any_due_retry(due: str) -> ColumnElement[bool]:
    """Whether any ``retry_wait`` job is due so (:func:`_due_retry_moment`): the first entry of
    the index on (``state``, ``next_attempt_at``) says. Never correlated with an enclosing query
    of the jobs (:func:`in_flight`)."""
    where = (_RETRY_WAITING, _due_retry_moment(due))
    return select(literal(1)).select_from(_JOBS).where(*where).correlate(None).exists()


def _count_due(scoped: bool) -> Any:
    """How many ``retry_wait`` jobs of ``batch_id`` (``scoped``) or of all are due at once and
    how many are due by ``now``, each counted up to :data:`FEW_DUE_RETRIES` on the index alone."""

    def counted(due: str) -> Any:
        where = [_RETRY_WAITING, _due_retry_moment(due)]
        if scoped:
            where.append(_JOBS.c.batch_id == bindparam("batch_id"))
        few = select(literal(1)).where(*where).limit(bindparam("few")).subquery()
        return select(func.count()).select_from(few).scalar_subquery()

    return select(counted("unset"), counted("passed"))


class _NotInIndexOrder(ColumnElement[Any]):
    """A column to sort by that no index may be read in the order of, so that the query reads
    the index its conditions narrow down and sorts what that finds: on SQLite ``+column``
    (SQLite's own way to keep an index out of a term), on PostgreSQL the column plus no time.

    A due-retry claim sorts the few due jobs it found through ``next_attempt_at``
    (:func:`_due_retries`). Seeing its ``ORDER BY`` served by the index in claim order, SQLite
    read every ``retry_wait`` job of the batch in that order instead, skipping those not due;
    so did PostgreSQL whenever its statistics had not yet seen the outage's retries."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012 (SQLAlchemy's)

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_NotInIndexOrder)
def _in_any_order(element: _NotInIndexOrder, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.column, **kw))


@compiles(_NotInIndexOrder, "sqlite")
def _not_in_sqlite_index_order(element: _NotInIndexOrder, compiler: Any, **kw: Any) -> str:
    return "+" + str(compiler.process(element.column, **kw))


@compiles(_NotInIndexOrder, "postgresql")
def _not_in_postgresql_index_order(element: _NotInIndexOrder, compiler: Any, **kw: Any) -> str:
    return "(" + str(compiler.process(element.column, **kw)) + " + INTERVAL '0 seconds')"


#: What a claim of :func:`_due_fairly` reads of each job: the columns of
#: :class:`~jobs.models.JobRecord` (the type every use of a claimed job goes by) and its sort keys.
#: Every column of the table (about sixty) made the claim cost three times what reading the
#: ids does, most of it converting fal's answers, outputs and media nothing of the round reads.
_RECORD_COLUMNS = [c for c in _JOBS.c if c.name in JOB_RECORD_FIELDS | {"created_at", "item_index"}]


def _claim_candidates(
    scoped: bool,
    active_only: bool,
    by_endpoint: bool,
    excluding: bool,
    excluding_batches: bool,
    by_origin: bool = False,
    *,
    record: bool = False,
    due: str | None = None,
) -> Any:
    """The candidate query of :func:`claim_jobs` for one state (and batch), oldest first: the
    ids and sort keys, or (``record``) those and the columns of :class:`~jobs.models.JobRecord`
    (:data:`_RECORD_COLUMNS`). ``due``: only ``retry_wait``
    jobs due at once (``unset``) or whose moment has come (``passed``), found through their
    ``next_attempt_at`` (:func:`_due_retries`)."""
    now: BindParameter[datetime] = bindparam("now")
    conditions: list[ColumnElement[bool]] = [
        _JOBS.c.state == bindparam("state", type_=_JOBS.c.state.type)
        if due is None
        else _RETRY_WAITING,  # its ``state`` parameter is ``retry_wait``
        or_(_JOBS.c.next_attempt_at.is_(None), _JOBS.c.next_attempt_at <= now)
        if due is None
        else _due_retry_moment(due),
        or_(_JOBS.c.lease_expires_at.is_(None), _JOBS.c.lease_expires_at <= now),
    ]
    if scoped:
        conditions.append(_JOBS.c.batch_id == bindparam("batch_id"))
    if by_endpoint:
        conditions.append(_JOBS.c.endpoint.in_(bindparam("endpoints", expanding=True)))
    if excluding:
        conditions.append(_JOBS.c.id.not_in(bindparam("exclude_ids", expanding=True)))
    if excluding_batches:
        conditions.append(_JOBS.c.batch_id.not_in(bindparam("exclude_batch_ids", expanding=True)))
    if active_only:
        conditions.append(exists().where(Batch.id == _JOBS.c.batch_id, Batch.state == BatchState.ACTIVE))
    if by_origin:
        conditions.append(sent_to_origin(bindparam("sent_to")))
    columns = _RECORD_COLUMNS if record else [_JOBS.c.id, _JOBS.c.created_at, _JOBS.c.item_index]
    first: ColumnElement[Any] = _JOBS.c.created_at if due is None else _NotInIndexOrder(_JOBS.c.created_at)
    return (
        select(*columns)
        .where(*conditions)
        .order_by(first, _JOBS.c.item_index, _JOBS.c.id)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True, of=_JOBS)  # ignored by SQLite, whose writer is alone
    )


def bring_waits_forward(session: Session, *, by: timedelta, now: datetime) -> int:
    """Every wait still ahead of ``now`` (a retry's backoff, a poll's, a download's) that much
    earlier: the clock the waits were stamped on stepped back ``by`` (:func:`catch_up_with_timeline`:
    NTP correcting a clock that ran ahead, a VM resumed with a stale one), which left each due
    that much later than it was meant to be; an hour's step held a run's retries back an hour.
    A wait stamped after the step comes due early, never late. No version bump: who holds the
    job writes what it was going to. How many jobs."""
    ahead = session.execute(
        select(_JOBS.c.id, _JOBS.c.next_attempt_at).where(_JOBS.c.next_attempt_at > now)
    ).all()
    if ahead:  # rare (a step of the clock), and row by row: no date arithmetic SQLite and PostgreSQL share
        session.execute(
            update(_JOBS).where(_JOBS.c.id == bindparam("job")).values(next_attempt_at=bindparam("at")),
            [{"job": row.id, "at": row.next_attempt_at - by} for row in ahead],
        )
    return len(ahead)


_MARK = cast(Table, ClockMark.__table__)
#: :class:`ClockMark`'s one row.
_MARK_ID = 1


class TimelineLook(NamedTuple):
    """What :func:`catch_up_with_timeline` found and did."""

    #: How far the clock went back (zero: it did not, or another process caught up already).
    back: timedelta
    #: How many jobs' waits were brought forward.
    moved: int
    #: The high-water mark as the database holds it now.
    mark: datetime


def catch_up_with_timeline(
    session: Session, *, now: datetime, step: timedelta, slack: timedelta = timedelta(0)
) -> TimelineLook:
    """Keep the timeline's high-water mark (:class:`ClockMark`) and catch up with a backward step
    of the clock: ``now`` more than ``step`` before the mark, every wait still ahead is brought
    forward by the difference (:func:`bring_waits_forward`) and the mark set to ``now``; else the
    mark is raised to ``now`` once ``now`` passed it by more than ``slack``
    (:data:`jobs.clock.MARK_SLACK_SECONDS`: no write at every tick). Idempotent across processes
    when each calls it in a transaction that holds the writer (SQLite's ``BEGIN IMMEDIATE``),
    reading ``now`` once it does: the second to come after a step finds the mark lowered, nothing
    to move."""
    mark = session.execute(select(_MARK.c.high_water).where(_MARK.c.id == _MARK_ID)).scalar_one_or_none()
    if mark is None:
        session.execute(insert(_MARK).values(id=_MARK_ID, high_water=now))
        return TimelineLook(timedelta(0), 0, now)
    if now < mark - step:
        back = mark - now
        moved = bring_waits_forward(session, by=back, now=now)
    elif now > mark + slack:
        back, moved = timedelta(0), 0
    else:
        return TimelineLook(timedelta(0), 0, mark)
    session.execute(update(_MARK).where(_MARK.c.id == _MARK_ID).values(high_water=now))
    return TimelineLook(back, moved, now)
