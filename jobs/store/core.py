"""The store's plumbing, shared by every part of :mod:`jobs.store`: the ``jobs`` table and the
column expressions several verbs write, statements built once and kept (:func:`_prepared`, one
cache for the whole process), running them on the session's connection (:func:`_run`), the
dialect's ``INSERT … ON CONFLICT`` and the fields a caller may set."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import ColumnElement, Connection, Table, and_, case, literal, literal_column, or_, select
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key
from sqlalchemy.sql.elements import BindParameter

from jobs.models import Batch, Job
from jobs.states import JobState
from jobs.store.direct import run_reusable

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql


#: A batch id prefix must be at least this long to be accepted as a reference.
MIN_ID_PREFIX = 6

#: Columns a caller may set through :func:`transition` / :func:`update_job_fields`. Identity,
#: state and the fencing token are managed here and nowhere else.
_PROTECTED = frozenset({"id", "batch_id", "job_key", "state", "version", "created_at", "updated_at"})
_SETTABLE = frozenset(Job.__table__.columns.keys()) - _PROTECTED

#: A job's ``actual_usd`` is what its attempts were billed, written as each attempt ends. In
#: ``downloading`` fal has finished the current attempt (billed in full once its video is
#: stored), but its bill is written only when the download ends: until then ``actual_usd`` holds
#: only what the earlier attempts cost, and the current attempt counts at its estimate on top
#: (:func:`finished_usd`, :func:`spent_usd`). A ``succeeded`` job without a recorded cost counts
#: at its estimate.
#: Where a job leaves ``submit_unknown`` without proof that fal has its request (a webhook, a
#: late answer): failed, resent as a new attempt, cancelled. fal may have accepted (and billed)
#: the request all the same, so its estimate moves into ``ambiguous_usd`` and stays counted.
UNPROVEN_EXITS = frozenset({JobState.FAILED, JobState.RETRY_WAIT, JobState.CANCELLED})


def _dialect_insert(dialect: str, target: Any) -> postgresql.Insert | sqlite.Insert:
    """An ``INSERT`` into ``target`` that can take ``ON CONFLICT`` clauses, in ``dialect``'s
    (``"postgresql"`` or ``"sqlite"``) form. SQLAlchemy's PostgreSQL dialect is imported here,
    by a process that uses PostgreSQL, not by every one: about 20 ms of a SQLite process's
    start-up (``sqlalchemy.dialects.postgresql`` loads its asyncpg, pg8000 and psycopg modules)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(target)
    return sqlite.insert(target)


_JOBS = cast(Table, Job.__table__)
#: The attempt after the current one: a resend's number (:func:`retry_later`).
_NEXT_ATTEMPT = _JOBS.c.attempts + 1
#: Whether the attempt under way is the resend of a submit whose outcome stayed unknown.
_IS_RESEND = _JOBS.c.resend_attempt == _JOBS.c.attempts
#: ``possible_duplicate_charges`` once the attempt's POST is recorded as sent (:func:`record_send`).
#: The start timeout the POST replaces is kept (``earlier_start_timeout_at``): :func:`give_back`
#: puts it back when the POST is refused or never goes out (:data:`_OUTSTANDING_START_TIMEOUT`).
_RESEND_SENT: dict[str, ColumnElement[Any]] = {
    "possible_duplicate_charges": _JOBS.c.possible_duplicate_charges + case((_IS_RESEND, 1), else_=0),
    "earlier_start_timeout_at": _JOBS.c.start_timeout_at,
}
#: ``earlier_items`` once the job is sent as a new request (:func:`record_send`): without
#: :data:`EARLIER_ITEMS_UNKNOWN`, the numbers recorded kept in their order (NULL when none is
#: left). A number nobody recorded was taken from the job before schema 0032, so the file a try
#: saved under it was saved before then: never a video of a request sent now (a download takes
#: only one written since its request was sent), and only listing the folder finds it.
_UNKNOWN_DROPPED_PG = (
    "CASE WHEN jobs.earlier_items @> '[-1]'::jsonb THEN (SELECT jsonb_agg(t.e ORDER BY t.o)"
    " FROM jsonb_array_elements(jobs.earlier_items) WITH ORDINALITY AS t(e, o)"
    " WHERE t.e <> '-1'::jsonb) ELSE jobs.earlier_items END"
)
_UNKNOWN_DROPPED_SQLITE = (
    "CASE WHEN EXISTS (SELECT 1 FROM json_each(jobs.earlier_items) AS t WHERE t.value = -1)"
    " THEN (SELECT CASE WHEN count(*) = 0 THEN NULL ELSE json_group_array(kept.v) END FROM ("
    " SELECT t.value AS v FROM json_each(jobs.earlier_items) AS t WHERE t.value IS NOT -1"
    " ORDER BY t.key) AS kept) ELSE jobs.earlier_items END"
)
_SENT_PG = {**_RESEND_SENT, "earlier_items": literal_column(_UNKNOWN_DROPPED_PG, _JOBS.c.earlier_items.type)}
_SENT_SQLITE = {
    **_RESEND_SENT,
    "earlier_items": literal_column(_UNKNOWN_DROPPED_SQLITE, _JOBS.c.earlier_items.type),
}
#: ``possible_duplicate_charges`` when the attempt is given back: a resend recorded as sent
#: (its input written) that did not go out is uncounted (:func:`give_back`).
_RESEND_UNSENT = _JOBS.c.possible_duplicate_charges - case(
    (_IS_RESEND & _JOBS.c.submitted_input.is_not(None), 1), else_=0
)
#: ``start_timeout_at`` once a claimed attempt is given back (:func:`give_back`): the start
#: timeout of the request that may still be at fal. Only a resend of a submit whose outcome
#: stayed unknown (:data:`_IS_RESEND`) has one — the earlier attempt's, which the claim kept
#: (:func:`mark_submitting`) and a recorded POST replaced, keeping it aside (:func:`record_send`);
#: every other job's earlier requests have ended (fal's verdict), so it has none: NULL.
_OUTSTANDING_START_TIMEOUT = case(
    (
        _IS_RESEND,
        case(
            (_JOBS.c.sent_at.is_(None), _JOBS.c.start_timeout_at),
            else_=_JOBS.c.earlier_start_timeout_at,
        ),
    ),
    else_=None,
)
#: ``attempts`` once an attempt that was never sent is taken back (:func:`give_back`, :func:`fail_unsent`).
_NOT_COUNTED = case((_JOBS.c.attempts > 0, _JOBS.c.attempts - 1), else_=0)
#: ``ambiguous_usd`` grown by the job's estimate (:data:`UNPROVEN_EXITS`) — but not for a
#: simulation's job: its POST went to the simulator of a ``--simulate`` run, never to a provider
#: that bills, so nothing of it was possibly billed (``cost`` of a simulation says "nothing was
#: paid", and must not say "possibly billed" beside it).
_POSSIBLY_BILLED_MORE = case(
    (
        select(Batch.simulated).where(Batch.id == _JOBS.c.batch_id).scalar_subquery().is_(True),
        _JOBS.c.ambiguous_usd,
    ),
    else_=_JOBS.c.ambiguous_usd + _JOBS.c.est_usd,
)


_PREPARED: dict[tuple[Any, ...], Any] = {}


def _prepared(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """A statement built once per ``key`` and reused, its variable parts bound at execution.

    The hot queries (claims, the caps' counts, budget sums, transitions) run on every
    completion. Building a statement and deriving its cache key cost more CPU than running it
    on SQLite; a kept statement object memoises its cache key, so reusing it costs neither.
    """
    statement = _PREPARED.get(key)
    if statement is None:
        statement = _PREPARED[key] = _kept(build())
    return statement


#: Identities of the statements kept for the life of the process (:func:`_prepared`, the
#: transitions' shapes): :func:`jobs.store.direct.run_reusable` may keep their compiled form.
_KEPT: set[int] = set()


def _kept(statement: Any) -> Any:
    """Mark ``statement`` as kept for good (its holder never lets it go) and return it."""
    _KEPT.add(id(statement))
    return statement


#: ``session.info`` key: (the session's root transaction, its connection), :func:`session_connection`.
_CONNECTION_KEY = "wanbatch.connection"


def session_connection(session: Session) -> Connection:
    """``session.connection()``, kept for the rest of the session's transaction.

    Each statement of a round asked the session for its connection again (the bind looked up,
    the transaction's state machine walked: about as much CPU as building the statement's
    arguments), while a transaction holds one connection for its whole life — a SAVEPOINT
    (``begin_nested``) runs on its parent's. Kept beside the root transaction it belongs to,
    and used only while that very transaction is still the session's and active: a new
    transaction (after a commit or a rollback), or one a failure left inactive, asks the
    session again, which raises as it always did."""
    transaction = session.get_transaction()
    kept = session.info.get(_CONNECTION_KEY)
    if kept is not None and kept[0] is transaction and transaction is not None and transaction.is_active:
        return cast(Connection, kept[1])
    connection = session.connection()
    session.info[_CONNECTION_KEY] = (session.get_transaction(), connection)
    return connection


def _run(session: Session, statement: Any, params: Mapping[str, Any] | None = None) -> Any:
    """Execute a Core statement on the session's connection, in the session's transaction.

    ``Session.execute`` costs about twice the CPU of ``Connection.execute`` for a statement
    that loads no ORM objects (it builds an ORM execution state and runs its hooks first);
    every job runs a few dozen such statements on its way, so the hot ones come here, and the
    kept ones (:func:`_prepared`) go on to :func:`jobs.store.direct.run_reusable`, which on SQLite and
    on PostgreSQL (psycopg) runs them on the driver directly. Changes pending on the session's
    objects are flushed first, as ``Session.execute`` would. The result answers
    ``first``/``one``/``scalar``/``all`` and iteration, its rows by index, by name and ``_mapping``.
    """
    # ``Session.flush``'s own test of whether anything is pending: ``new``, ``dirty`` and
    # ``deleted`` each build a collection, three per statement of every round.
    if session.autoflush and not session._is_clean():
        session.flush()
    connection = session_connection(session)
    if id(statement) in _KEPT:
        return run_reusable(connection, statement, params)
    return connection.execute(statement, params)


def _refresh_loaded(session: Session, job_id: str, written: Mapping[Any, Any]) -> None:
    """Give the session's copy of ``job_id``, if it holds one, the values just written (a Core
    UPDATE does not touch the identity map; callers keep using the object after the session
    closes, so it is updated in place rather than expired). A session that holds no object at
    all (a dispatch round's, a stream's statuses: Core rows only) is not asked by key."""
    if not len(session.identity_map):
        return
    loaded = session.identity_map.get(identity_key(Job, job_id))
    if loaded is not None:
        for name, value in written.items():  # the model's attributes are named as its columns
            set_committed_value(loaded, name, value)


def _same_request_elsewhere(other: Any, request_id: Any, job_id: Any, origin: Any) -> ColumnElement[bool]:
    """The one rule of which jobs hold "the same request" as job ``job_id`` would with
    ``request_id`` in fal queue ``origin``: ``other`` (:class:`~jobs.models.Job`, an alias of it,
    or the jobs table's columns) is another job holding that id, sent to that queue or to one
    nobody recorded (sent before schema 0034); an ``origin`` nobody recorded (NULL) matches every
    queue. An id is
    fal's within one queue: a job of another queue (another simulator, another deployment
    sharing the database) holding the same id holds another request.
    :func:`request_holder` and :func:`adopt_requests_sent_elsewhere` both read it."""
    origin_expr = origin if isinstance(origin, ColumnElement) else literal(origin, Job.fal_origin.type)
    return and_(
        other.request_id == request_id,
        other.id != job_id,
        or_(origin_expr.is_(None), other.fal_origin.is_(None), other.fal_origin == origin_expr),
    )


def sent_to_origin(origin: str | BindParameter[Any]) -> ColumnElement[bool]:
    """Jobs whose request went to the fal queue at ``origin``, or to one not recorded (sent
    before schema 0034): the requests a process configured with that queue may ask about."""
    return or_(_JOBS.c.fal_origin == origin, _JOBS.c.fal_origin.is_(None))


def _sent_with(api_key_id: str | BindParameter[Any]) -> ColumnElement[bool]:
    """Jobs sent with this API key, or with none recorded (e.g. in flight across the upgrade that
    added the column): counting those too errs on the side of the cap."""
    return or_(Job.api_key_id == api_key_id, Job.api_key_id.is_(None))


def _paid(batch_id: Any) -> ColumnElement[bool]:
    """``batch_id`` (a column) is not a simulation's: a ``--simulate`` run's money is made up (the
    simulator bills nothing), so it never counts toward the daily budget, which is about fal's."""
    simulations = select(Batch.id).where(Batch.simulated.is_(True)).scalar_subquery()
    return cast(ColumnElement[bool], batch_id.not_in(simulations))
