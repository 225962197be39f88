"""State changes: :func:`transition`, the one compare-and-set under every verb, the fenced
write of non-state fields (:func:`update_job_fields`), the :class:`Fence` a caller holds, the
finished money a terminal move adds to its batch's totals, and the check that no two jobs of a
fal queue hold the same request (:func:`refuse_held_request`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    case,
    delete,
    event,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.orm import Session, SessionTransaction

from jobs import db
from jobs.errors import RequestHeldError
from jobs.models import BatchTotals, Job, JobEvent, JobRecord, KeyRefusal, utcnow
from jobs.states import JobState, can_transition
from jobs.store.core import (
    _JOBS,
    _POSSIBLY_BILLED_MORE,
    _SETTABLE,
    UNPROVEN_EXITS,
    _dialect_insert,
    _kept,
    _prepared,
    _refresh_loaded,
    _run,
    _same_request_elsewhere,
    session_connection,
)
from jobs.store.key_refusals import REFUSABLE_STATES


def incremented(column: str, by: int = 1) -> ColumnElement[int]:
    """A field value meaning "the column plus ``by``".

    E.g. ``transition(…, attempts=incremented("attempts"))``.
    The increment happens in the UPDATE itself, so it is never lost to a concurrent read.
    """
    if column not in _SETTABLE:
        raise ValueError(f"cannot increment jobs.{column}")
    return getattr(Job, column) + by  # type: ignore[no-any-return]


def _check_fields(fields: dict[str, Any]) -> None:
    bad = set(fields) - _SETTABLE
    if bad:
        raise ValueError(f"not settable job fields: {sorted(bad)}")


def _refuse_held_in(session: Session, job_id: str, fields: Mapping[str, Any]) -> None:
    """:func:`refuse_held_request` for a write of ``fields`` that gives the job a request id."""
    request_id = fields.get("request_id")
    if isinstance(request_id, str):
        refuse_held_request(session, job_id, request_id)


def transition(
    session: Session,
    job_id: str,
    expected: JobState,
    new: JobState,
    *,
    reason: str | None = None,
    expected_version: int | None = None,
    worker: str | None = None,
    details: dict[str, Any] | None = None,
    row: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move a job from ``expected`` to ``new`` if (and only if) it is still there.

    The one compare-and-set under every verb below (:func:`fail_job`, :func:`retry_later`, …),
    which the product calls instead: each names what happened and fixes the fields it writes.

    Returns ``False`` when the job is no longer in ``expected`` (or no longer at
    ``expected_version``): someone else moved it, and the caller must re-read rather than act.
    On success the version grows by one, ``fields`` are written in the same UPDATE, a
    :class:`JobEvent` is added, and a job reaching a terminal state gets ``finished_at`` and
    loses its lease. ``next_attempt_at`` is cleared (the job is due at once in its new state)
    unless given in ``fields``; the lease is kept for non-terminal states.

    Raises ``ValueError`` for an edge the lifecycle forbids or a field that may not be set:
    both are programming errors, not races. A ``request_id`` another job of the job's fal queue
    holds raises :class:`~jobs.errors.RequestHeldError` before anything is written
    (:func:`refuse_held_request`): every path that gives a job a request comes through here.
    ``row``: a dict to fill with every column of the job as the move left it, returned by the
    UPDATE itself (under its row lock): what a caller would otherwise read again right after
    (:func:`~jobs.store.job_snapshots`), one statement more per move. Left empty when the job
    did not move. Never commits.
    """
    if not can_transition(expected, new):
        raise ValueError(f"illegal job transition {expected.value} -> {new.value}")
    _check_fields(fields)
    logged = session_connection(session).dialect.name == "postgresql"
    # On PostgreSQL the check takes the request's advisory lock first (:func:`request_holder`);
    # on SQLite, whose writers take turns on the whole file, the UPDATE itself refuses a request
    # another job holds (``NOT EXISTS``), and only a move that did not happen asks why.
    guarded = not logged and isinstance(fields.get("request_id"), str)
    if not guarded:
        _refuse_held_in(session, job_id, fields)
    now = utcnow()
    values: dict[str, Any] = {"next_attempt_at": None, **fields}
    if new.terminal:
        values = {"finished_at": now, "lease_owner": None, "lease_expires_at": None, **values}
    if expected == JobState.SUBMIT_UNKNOWN and new in UNPROVEN_EXITS:
        values["ambiguous_usd"] = _POSSIBLY_BILLED_MORE
    if expected in UNSENT_STATES and new in _UNBILLED_ENDS and "actual_usd" not in fields:
        # Ending without (another) send: a job never sent is billed nothing, for good.
        values["actual_usd"] = _ZERO_IF_NEVER_SENT
        values.setdefault("actual_billing_units", _ZERO_UNITS_IF_NEVER_SENT)
    if new == JobState.SUBMIT_UNKNOWN and "submitted_at" not in fields:
        # The POST went out, and fal may have accepted (and billed) it: the job was sent, when
        # its POST left (``sent_at``). Its money is then counted under that day, as it would be
        # had the answer come (:class:`BatchTotals`, the daily budget), and never under no day.
        values["submitted_at"] = func.coalesce(_JOBS.c.sent_at, literal(now, _JOBS.c.submitted_at.type))
    values.update(state=new, updated_at=now)
    # Leaving the states in which a job waits on what fal says of its request: fal's refusals
    # of that request to a key (:mod:`jobs.store.key_refusals`) describe nothing any more, and
    # go with the move (a table that grew with every such job, its stale rows ignored).
    leaving = expected in REFUSABLE_STATES and new not in REFUSABLE_STATES
    # Core statements on the tables, not ORM-enabled ones, built once per shape and then only
    # executed with new parameters: every job moves several times, and building and caching an
    # ORM bulk UPDATE cost more CPU than the rest of a job's bookkeeping. The session's copy of
    # the job, if it holds one, is given the values written (it is not synchronised otherwise).
    # The event's columns; on PostgreSQL the same names are the statement's own parameters.
    event = {
        "at": now,
        "from_state": expected,
        "to_state": new,
        "reason": reason,
        "details": details,
        "worker": worker,
    }
    statement, params = _transition_statement(
        values,
        with_version=expected_version is not None,
        finishing=new.terminal,
        logged=logged,
        whole=row is not None,
        guarded=guarded,
        leaving=leaving,
    )
    params.update(w_id=job_id, w_expected=expected, w_version=expected_version)
    if logged:
        params.update(event)
    moved = _run(session, statement, params).first()
    if moved is None:
        if guarded:  # not moved: held by another job (raised here, nothing written), or moved on
            _refuse_held_in(session, job_id, fields)
        return False
    written: Mapping[str, Any] = moved._mapping
    refused = False
    if leaving and not logged:  # the UPDATE said whether the job has refusals to forget
        written = dict(written)
        refused = bool(written.pop(_REFUSALS_HELD))
    _refresh_loaded(session, job_id, written)
    if new.terminal:
        usd = finished_usd(new, moved.actual_usd, moved.est_usd, moved.ambiguous_usd)
        _add_finished(session, moved.batch_id, moved.submitted_at, usd)
    if not logged:
        _run(session, _INSERT_EVENT, {"job_id": job_id, "version": moved.version, **event})
        if refused:
            _run(session, _FORGET_REFUSALS, {"job_id": job_id})
    if row is not None:
        row.update(written)
    return True


_EVENTS = cast(Table, JobEvent.__table__)
_INSERT_EVENT = _kept(insert(_EVENTS))
_REFUSALS = cast(Table, KeyRefusal.__table__)
#: A job's refusals going with its move out of :data:`REFUSABLE_STATES` (SQLite; PostgreSQL's
#: statement does it in a ``WITH`` of its own, :func:`_with_event`). Run only when the move's
#: UPDATE returned that the job has some (:data:`_REFUSALS_HELD`).
_FORGET_REFUSALS = _kept(delete(_REFUSALS).where(_REFUSALS.c.job_id == bindparam("job_id")))
#: The column a move out of :data:`REFUSABLE_STATES` returns on SQLite: whether the job has
#: :class:`KeyRefusal` rows, read by the UPDATE itself (a look-up in the table's primary key).
#: Nearly every job has none, and the DELETE run after every such move was a statement per job
#: for nothing. Nothing can add a refusal between the two statements: the transaction holds
#: SQLite's write lock from its ``BEGIN IMMEDIATE`` (:func:`jobs.db._configure_sqlite`).
_REFUSALS_HELD = "wanbatch_refusals_held"
_EVENT_COLUMNS = ("job_id", "at", "from_state", "to_state", "version", "reason", "worker")
#: What a transition's event row is written from, in this order (:func:`_with_event`).
_EVENT_ROW_COLUMNS = ("job_id", "at", "from_state", "to_state", "version", "reason", "details", "worker")

_STATEMENTS: dict[tuple[tuple[str, ...], bool, bool, bool, bool, bool, bool], Any] = {}

#: What a transition to a terminal state also returns: the job's share of its batch's
#: finished money (:func:`finished_usd`) is known only once the row is written.
_FINISHING_RETURNS = ("batch_id", "submitted_at", "actual_usd", "est_usd", "ambiguous_usd")


def _transition_statement(
    values: dict[str, Any],
    *,
    with_version: bool,
    finishing: bool = False,
    logged: bool = False,
    whole: bool = False,
    guarded: bool = False,
    leaving: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """The UPDATE … RETURNING of a transition writing ``values``, and its parameters.
    ``whole``: it returns every column of the job (:func:`transition`'s ``row``). ``guarded``
    (SQLite, ``values`` giving a ``request_id``): it moves no job whose new request another job
    of its fal queue holds (:func:`_same_request_elsewhere`, as :func:`request_holder` reads it).

    Plain values become bound parameters of a statement kept per set of columns (a dozen
    shapes in all); a SQL expression (:func:`incremented`) makes a statement of its own.

    ``logged`` (PostgreSQL): the statement also writes the transition's :class:`JobEvent`, from
    a data-modifying ``WITH`` that inserts a row only when the UPDATE moved one, and takes the
    event's values as parameters named as its columns (``at``, ``from_state``, …). One
    statement and one round trip per move instead of two: every job moves five times, and on
    PostgreSQL each statement is a network round trip and a pass through the driver. A
    data-modifying ``WITH`` runs exactly once whether or not the outer query reads it (https://www.postgresql.org/docs/current/queries-with.html#QUERIES-WITH-MODIFYING).
    SQLite has no data-modifying ``WITH``: there the event is a second INSERT. ``leaving`` (the
    job leaves :data:`REFUSABLE_STATES`): on PostgreSQL its :class:`KeyRefusal` rows are deleted
    by one more ``WITH`` of the same statement; on SQLite the UPDATE also returns whether it has
    any (:data:`_REFUSALS_HELD`), and only then does :data:`_FORGET_REFUSALS` follow it.
    """
    plain: dict[str, Any] = {}
    expressions: dict[str, Any] = {}
    for k, v in values.items():  # one look at each value: every move of every job comes here
        (expressions if isinstance(v, ColumnElement) else plain)[k] = v
    key = (tuple(sorted(plain)), with_version, finishing, logged, whole, guarded, leaving)
    statement = None if expressions else _STATEMENTS.get(key)
    if statement is None:
        conditions = [
            _JOBS.c.id == bindparam("w_id"),
            _JOBS.c.state == bindparam("w_expected", type_=_JOBS.c.state.type),
        ]
        if with_version:
            conditions.append(_JOBS.c.version == bindparam("w_version"))
        if guarded:
            other = _JOBS.alias("other")
            held = _same_request_elsewhere(other.c, bindparam("v_request_id"), _JOBS.c.id, _JOBS.c.fal_origin)
            conditions.append(~exists().where(held))
        written = {k: bindparam(f"v_{k}", type_=_JOBS.c[k].type) for k in plain}
        extra = _FINISHING_RETURNS if finishing else ()
        returned = dict.fromkeys((*plain, *expressions, "version", *extra))
        if whole:  # every column, in the table's order (what job_snapshots reads)
            returned = dict.fromkeys((*_JOBS.c.keys(), *returned))
        moving = (
            update(_JOBS)
            .where(*conditions)
            .values({**written, **expressions, "version": _JOBS.c.version + 1})
        )
        if logged:
            statement = _with_event(moving, returned, leaving=leaving)
        else:
            columns: list[Any] = [_JOBS.c[name] for name in returned]
            if leaving:  # SQLite allows subqueries in RETURNING (https://sqlite.org/lang_returning.html)
                columns.append(exists().where(_REFUSALS.c.job_id == _JOBS.c.id).label(_REFUSALS_HELD))
            statement = moving.returning(*columns)
        if not expressions:
            _STATEMENTS[key] = _kept(statement)
    return statement, {f"v_{k}": v for k, v in plain.items()}


def _with_event(moving: Any, returned: Iterable[str], *, leaving: bool = False) -> Any:
    """``WITH moved AS (UPDATE …), logged AS (INSERT INTO job_events SELECT … FROM moved)
    SELECT … FROM moved``: a transition and its event in one statement (PostgreSQL); with
    ``leaving``, also ``forgot AS (DELETE FROM key_refusals WHERE job_id IN (SELECT id FROM moved))``."""
    moved = moving.returning(*[_JOBS.c[name] for name in dict.fromkeys((*returned, "id"))]).cte("moved")
    event = select(
        moved.c.id,
        *[bindparam(name, type_=_EVENTS.c[name].type) for name in ("at", "from_state", "to_state")],
        moved.c.version,
        *[bindparam(name, type_=_EVENTS.c[name].type) for name in ("reason", "details", "worker")],
    )
    logged = insert(_EVENTS).from_select(list(_EVENT_ROW_COLUMNS), event).cte("logged")
    statement = select(*[moved.c[name] for name in returned]).add_cte(logged)
    if leaving:
        forgot = delete(_REFUSALS).where(_REFUSALS.c.job_id.in_(select(moved.c.id))).cte("forgot")
        statement = statement.add_cte(forgot)
    return statement


def finished_usd(
    state: JobState, actual_usd: Decimal | None, est_usd: Decimal, ambiguous_usd: Decimal = Decimal(0)
) -> Decimal:
    """A job's share of its batch's spent money (:class:`BatchMoney`; :func:`spent_usd` is the
    same in SQL), and so, once it is finished, of its batch's running totals: what fal billed
    its attempts (``actual_usd``) — for a succeeded job fal reported no cost for, its estimate;
    in ``downloading``, what the earlier attempts cost plus the estimate of the one fal just
    finished, whose bill is not written yet — plus what its submits whose outcome stayed
    unknown may have cost (``ambiguous_usd``)."""
    billed = actual_usd if actual_usd is not None else Decimal(0)
    if state == JobState.DOWNLOADING:
        billed += est_usd
    elif state == JobState.SUCCEEDED and actual_usd is None:
        billed = est_usd
    return billed + ambiguous_usd


#: ``session.info`` key: (batch id, day) → finished money added by this transaction, not yet written.
_FINISHED_KEY = "wanbatch.finished_usd"
#: ``session.info`` key: some of that money was added outside a :func:`jobs.db.covered` block.
_FINISHED_SYNCED_KEY = "wanbatch.finished_synced"


def utc_day(moment: datetime | None) -> str:
    """The :class:`BatchTotals` day of a job last submitted at ``moment`` (``""``: never)."""
    return "" if moment is None else moment.astimezone(UTC).date().isoformat()


def _add_finished(session: Session, batch_id: str, submitted_at: datetime | None, usd: Decimal) -> None:
    """Count ``usd`` into the finished money of the batch (and of the day of the job's last
    submit) when this transaction commits."""
    if usd:
        pending: dict[tuple[str, str], Decimal] = session.info.setdefault(_FINISHED_KEY, {})
        key = (batch_id, utc_day(submitted_at))
        pending[key] = pending.get(key, Decimal(0)) + usd
        if not db.in_covered(session):
            session.info[_FINISHED_SYNCED_KEY] = True


_TOTALS = cast(Table, BatchTotals.__table__)


def _totals_upsert(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (batch_id, day) DO UPDATE`` adding to the row (both dialects)."""
    new = _dialect_insert(dialect, _TOTALS)
    return new.on_conflict_do_update(
        index_elements=[_TOTALS.c.batch_id, _TOTALS.c.day],
        set_={"finished_usd": _TOTALS.c.finished_usd + new.excluded.finished_usd},
    )


@event.listens_for(Session, "before_commit")
def _write_finished(session: Session) -> None:
    """Add the finished money of this transaction's jobs to their totals, last and in key
    order: two transactions that finish jobs of the same batches then take these row locks in
    the same order, after every job row lock they need (no lock cycle through them)."""
    pending: dict[tuple[str, str], Decimal] | None = session.info.pop(_FINISHED_KEY, None)
    synced = session.info.pop(_FINISHED_SYNCED_KEY, False)
    if not pending:
        return
    dialect = session.connection().dialect.name
    upsert = _prepared(("finished-add", dialect), lambda: _totals_upsert(dialect))
    # The totals follow the moves that added to them: synced unless every one was covered.
    with contextlib.nullcontext() if synced else db.covered(session):
        for (batch_id, day), usd in sorted(pending.items()):
            _run(session, upsert, {"batch_id": batch_id, "day": day, "finished_usd": usd})


@event.listens_for(Session, "after_transaction_end")
def _forget_finished(session: Session, transaction: SessionTransaction) -> None:
    """A rolled-back transaction's finished money never happened (a committed one's is written)."""
    if transaction.parent is None:
        session.info.pop(_FINISHED_KEY, None)
        session.info.pop(_FINISHED_SYNCED_KEY, None)


def update_job_fields(session: Session, job_id: str, *, expected_version: int, **fields: Any) -> bool:
    """Write non-state fields (request id, URLs, progress) fenced by ``version``; no bump.

    Returns ``False`` when the job moved on (its version changed), i.e. the caller's lease or
    view is stale and it must not act further.
    """
    _check_fields(fields)
    if not fields:
        raise ValueError("update_job_fields needs at least one field")
    if any(isinstance(v, ColumnElement) for v in fields.values()):
        raise ValueError("update_job_fields writes values, not SQL expressions")
    _refuse_held_in(session, job_id, fields)
    return _fenced_update(session, job_id, expected_version, {**fields, "updated_at": utcnow()}) is not None


@dataclass(frozen=True, slots=True)
class Fence:
    """A job as one worker holds it: every verb below is fenced by it, taken once.

    ``state`` and ``version`` are what the worker read: a verb moves the job only if it is still
    exactly there, and returns ``False`` otherwise (someone else moved it; re-read, never act).
    ``owner`` is who acts: it is written on the event row, and a verb that leases the job
    leases it to ``owner``.
    """

    job_id: str
    state: JobState
    version: int
    owner: str | None = None

    @classmethod
    def of(cls, job: JobRecord, owner: str | None = None) -> Fence:
        """The fence of a job just read (or claimed) by ``owner``."""
        return cls(job.id, JobState(job.state), job.version, owner)

    def moved(self, state: JobState) -> Fence:
        """The same hold once a verb fenced by it moved the job to ``state``: every move writes
        ``version + 1`` where the version is this one (:func:`transition`), so the new one is
        known without reading the job again."""
        return replace(self, state=state, version=self.version + 1)

    def at(self, version: int) -> Fence:
        """The same hold once the version moved on to ``version`` (e.g. by :func:`take_lease`)."""
        return replace(self, version=version)


#: Fields that let go of a job's lease.
_UNLEASED: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
#: Fields of a request at fal: the request is gone, or not known (a submit's lost answer).
_FORGET_REQUEST: dict[str, Any] = {
    "request_id": None,
    "gateway_request_id": None,
    "status_url": None,
    "response_url": None,
    "cancel_url": None,
}
#: The URLs of a request at fal, which only a request fal holds needs.
_FORGET_URLS: dict[str, Any] = {"status_url": None, "response_url": None, "cancel_url": None}


def _move(session: Session, fence: Fence, new: JobState, reason: str, **fields: Any) -> bool:
    return transition(
        session,
        fence.job_id,
        fence.state,
        new,
        reason=reason,
        expected_version=fence.version,
        worker=fence.owner,
        **fields,
    )


def request_holder(session: Session, job_id: str, request_id: str) -> str | None:
    """The id of another job than ``job_id`` that holds fal's request ``request_id`` in the
    fal queue ``job_id`` was sent to (its ``Job.fal_origin``: :func:`_same_request_elsewhere`),
    else None.

    fal's request ids are UUIDs, one per accepted POST: no path gives two jobs one request (a
    job taking another's output, ``reuse_outputs`` or a staged video, records ``reused_from``,
    never the request; a rerun's job sends its own; a late answer or a webhook's proof is kept
    by the job whose attempt it names). So an id another job holds — in a submit's answer, a
    webhook's proof, a journal's entry, a late answer — is a provider protocol error, and the
    job must not follow that request: its result is the other job's video, billed to it once
    already. Every write of a request id to a job checks it, in the transaction that writes it
    (:func:`transition`, :func:`update_job_fields`: :class:`~jobs.errors.RequestHeldError`; on
    SQLite a transition's UPDATE itself refuses such an id, and only asks this when it moved nothing);
    on PostgreSQL a transaction-level advisory lock on the id makes two jobs given one id take
    turns (under READ COMMITTED neither would see the other's uncommitted row). No unique
    index: simulations started with a fixed seed repeat their ids in one database (on
    different queues), and a database may already hold such duplicates."""
    params = {"job_id": job_id, "request_id": request_id}
    if session.connection().dialect.name == "postgresql":
        lock = _prepared(
            ("request-lock",),
            lambda: select(func.pg_advisory_xact_lock(func.hashtext(bindparam("request_id")))),
        )
        _run(session, lock, params)
    holder: str | None = _run(
        session, _prepared(("request-holder",), _request_holder_statement), params
    ).scalar()
    return holder


def _request_holder_statement() -> Any:
    """:func:`request_holder`'s query, built once (:func:`_prepared`): it runs in every submit's
    transaction, and building it (an alias and a subquery) cost more than the submit's POST."""
    mine = _JOBS.alias("mine")
    origin = select(mine.c.fal_origin).where(mine.c.id == bindparam("job_id")).scalar_subquery()
    return (
        select(_JOBS.c.id)
        .where(_same_request_elsewhere(_JOBS.c, bindparam("request_id"), bindparam("job_id"), origin))
        .limit(1)
    )


def refuse_held_request(session: Session, job_id: str, request_id: str) -> None:
    """Raise :class:`~jobs.errors.RequestHeldError` when another job of ``job_id``'s fal queue
    holds ``request_id`` (:func:`request_holder`): what every write of a request id to a job
    checks first, and what a path that would act on a request for a job (a late answer's
    cancel at fal, a webhook's duplicate charge) asks before it does."""
    holder = request_holder(session, job_id, request_id)
    if holder is not None:
        raise RequestHeldError(job_id, request_id, holder)


#: A job's ``actual_usd`` once it ends unsent (:data:`_UNBILLED_ENDS`): what earlier attempts
#: were billed if it was ever sent, else 0 — it never will be billed, so it has no estimate left.
_ZERO_IF_NEVER_SENT = func.coalesce(
    _JOBS.c.actual_usd,
    case((_JOBS.c.submitted_at.is_(None), literal(Decimal(0), _JOBS.c.actual_usd.type)), else_=None),
)
#: Its ``actual_billing_units`` alike: 0 units beside the $0 of a job never sent (exports show both).
_ZERO_UNITS_IF_NEVER_SENT = func.coalesce(
    _JOBS.c.actual_billing_units,
    case(
        (_JOBS.c.submitted_at.is_(None), literal(Decimal(0), _JOBS.c.actual_billing_units.type)), else_=None
    ),
)
_UNBILLED_ENDS = frozenset({JobState.FAILED, JobState.CANCELLED})

#: States of a job fal does not hold (or that we never heard back about): a cancel needs no call to fal.
UNSENT_STATES: tuple[JobState, ...] = (JobState.PENDING, JobState.RETRY_WAIT, JobState.SUBMIT_UNKNOWN)


def _fenced_update(
    session: Session,
    job_id: str,
    version: int,
    values: dict[str, Any],
    *,
    bump: bool = False,
    owner: str | None = None,
    counted: Mapping[str, ColumnElement[Any]] | None = None,
) -> Any:
    """``UPDATE jobs SET values [, version + 1] WHERE id, version [, lease_owner] RETURNING …``:
    the written row, or None when the job moved on. A prepared statement per set of columns
    (see :func:`_prepared`); the session's copy of the job, if loaded, gets the values written.
    ``counted``: columns set by SQL expressions as well — a module constant, since the prepared
    statement is kept per its identity."""
    computed = dict(counted or {})

    def build() -> Any:
        conditions = [_JOBS.c.id == bindparam("w_id"), _JOBS.c.version == bindparam("w_version")]
        if owner is not None:
            conditions.append(_JOBS.c.lease_owner == bindparam("w_owner"))
        written: dict[str, Any] = {k: bindparam(f"v_{k}", type_=_JOBS.c[k].type) for k in values}
        written.update(computed)
        if bump:
            written["version"] = _JOBS.c.version + 1
        return update(_JOBS).where(*conditions).values(written).returning(*[_JOBS.c[k] for k in written])

    key = ("fenced", tuple(values), bump, owner is not None, id(counted) if counted else None)
    statement = _prepared(key, build)
    params = {f"v_{k}": v for k, v in values.items()}
    params.update(w_id=job_id, w_version=version, w_owner=owner)
    row = _run(session, statement, params).first()
    if row is not None:
        _refresh_loaded(session, job_id, row._mapping)
    return row
