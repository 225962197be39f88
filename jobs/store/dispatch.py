"""What the dispatcher asks of the database: its lock, the submit rate's shared tokens and
pace (fal's 429 holds every process's submits of a key), and the batches it dispatches."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import Float, Table, and_, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session

from jobs import db
from jobs.models import Batch, BatchRecord, BatchState, SubmitPace, SubmitRate
from jobs.store.batches import _has_unfinished_jobs
from jobs.store.core import _dialect_insert, _prepared, _run, session_connection

#: Key of the PostgreSQL advisory lock one dispatch round holds at a time (an arbitrary constant
#: of PostgreSQL's signed 64-bit lock keys: "dispatch" in ASCII).
_DISPATCH_LOCK_KEY = 0x6469737061746368
#: The same key, for those who must find a round's holder (:meth:`worker.ticker.LeaderLock.watch_leader`).
DISPATCH_LOCK_KEY = _DISPATCH_LOCK_KEY


def lock_dispatch(session: Session) -> None:
    """Make this transaction the only dispatch round until it ends.

    A round checks the outstanding cap and the budgets against what is committed, so two rounds
    side by side would each fill them again (neither sees the other's claims). Rounds meet when
    a ``wanbatch run`` without a broker shares a PostgreSQL database with the workers' tick
    leader. There a transaction-level advisory lock makes them take turns
    (https://www.postgresql.org/docs/current/explicit-locking.html#ADVISORY-LOCKS), released at
    commit or rollback; on SQLite the transaction's write lock (``BEGIN IMMEDIATE``) already does.
    """
    if session_connection(session).dialect.name == "postgresql":
        _run(
            session,
            _prepared(("dispatch-lock",), lambda: select(func.pg_advisory_xact_lock(bindparam("key")))),
            {"key": _DISPATCH_LOCK_KEY},
        )


_SUBMIT_RATE = cast(Table, SubmitRate.__table__)
_SUBMIT_PACE = cast(Table, SubmitPace.__table__)


@dataclass(frozen=True, slots=True)
class SubmitTokens:
    """What :func:`take_submit_tokens` granted, and what the key's pacing row says besides."""

    #: Whole submits granted.
    granted: int
    #: Seconds until the next whole one (0.0 when one is left), or what is left of a 429's
    #: pause that held the grant back.
    wait: float
    #: Seconds a 429's pause, heard by any process (:func:`hold_submits`), still holds the key
    #: (0.0: none).
    held_for: float = 0.0
    #: Seconds the processes still share the key's pacing (:func:`share_pacing`; 0.0: not shared).
    shared_for: float = 0.0


def _epoch_now(dialect: str) -> Any:
    """Now, in epoch seconds, on the clock every process sharing the database compares:
    PostgreSQL's ``clock_timestamp()`` (the server's, at this statement: not ``now()``, the
    transaction's start); on SQLite, which has no server, the bound ``wall`` (the process's
    ``time.time()``: every process is on the one host that holds the file)."""
    if dialect == "postgresql":
        return func.extract("epoch", func.clock_timestamp())
    return bindparam("wall", type_=Float())


class RateRead(NamedTuple):
    """The key's shared bucket and pacing as a round reads them (:func:`rate_columns`): the
    bucket's ``tokens`` and ``stamp`` (None: no row yet), and the seconds a 429's pause still
    holds the key and the pacing is still shared (None or negative: not)."""

    tokens: float | None
    stamp: datetime | None
    held_for: float | None
    shared_for: float | None


def rate_columns(dialect: str) -> list[Any]:
    """The columns of :class:`RateRead`, in its order: one scalar subquery each, on the key's
    :class:`SubmitRate` and :class:`SubmitPace` rows (parameters ``key``, and ``wall`` on
    SQLite), whichever of the two rows is there (the pacing one is written by a heartbeat or a
    429, the bucket's by a round). Added to any one-row statement of the round."""
    clock = _epoch_now(dialect)
    key: Any = bindparam("key")

    def rate_of(column: Any) -> Any:
        return select(column).where(_SUBMIT_RATE.c.api_key_id == key).scalar_subquery()

    def pace_of(column: Any) -> Any:
        return select(column - clock).where(_SUBMIT_PACE.c.api_key_id == key).scalar_subquery()

    return [
        rate_of(_SUBMIT_RATE.c.tokens).label("tokens"),
        rate_of(_SUBMIT_RATE.c.stamp).label("stamp"),
        pace_of(_SUBMIT_PACE.c.hold_until).label("held_for"),
        pace_of(_SUBMIT_PACE.c.shared_until).label("shared_for"),
    ]


def _read_rate(session: Session, dialect: str, api_key_id: str, wall: float) -> RateRead:
    """:func:`rate_columns` read on their own."""
    read = _prepared(("rate-read", dialect), lambda: select(*rate_columns(dialect)))
    return RateRead(*_run(session, read, {"key": api_key_id, "wall": wall}).one())


def take_submit_tokens(
    session: Session,
    api_key_id: str,
    wanted: int,
    *,
    rate: float,
    capacity: float,
    now: datetime,
    wall: float,
    hold_over: float = float("inf"),
    read: RateRead | None = None,
) -> SubmitTokens:
    """Take up to ``wanted`` whole submits from the key's shared token bucket (:class:`SubmitRate`).

    Called in a dispatch round, after :func:`lock_dispatch`: rounds of every process take turns,
    so read-modify-write is safe, and ``rate`` (``WANBATCH_SUBMIT_RATE``) holds for them all
    together. The bucket refills at ``rate`` up to ``capacity`` from the time last written (a
    stamp ahead of ``now``, another host's clock, refills nothing). The same read says how long
    a 429's pause (:func:`hold_submits`) still holds the key and how long the pacing is still
    shared (:func:`share_pacing`), on the database's clock (``wall``: this process's epoch
    seconds, for SQLite); a pause longer than ``hold_over`` seconds grants nothing and takes
    nothing (its wait is what is left of it). That read of the key's :class:`SubmitPace` row
    takes no lock: the round, which keeps the bucket's row locked until it commits, never holds
    up a submit taking its slot there (:func:`take_pace_slot`). ``read``: that read, made by an
    earlier statement of the same round (:func:`jobs.store.in_flight` reads it with its counts:
    one statement less a round), after :func:`lock_dispatch` all the same; ``wall`` is then unused.

    The bucket's write is not synced on its own (:func:`jobs.db.covered`): a token is spent by a
    POST, and every POST waits for its :func:`record_send` to commit synced, which makes this
    write durable first; one lost to a power cut with nothing sent took nothing.
    """
    dialect = session_connection(session).dialect.name
    row = read if read is not None else _read_rate(session, dialect, api_key_id, wall)
    held_for = max(0.0, float(row.held_for or 0.0))
    shared_for = max(0.0, float(row.shared_for or 0.0))
    if held_for > hold_over:
        return SubmitTokens(0, held_for, held_for, shared_for)
    if row.tokens is None or row.stamp is None:  # no row yet (its two columns are never NULL)
        tokens = capacity
    else:
        elapsed = max(0.0, (now - row.stamp).total_seconds())
        tokens = min(capacity, float(row.tokens) + elapsed * rate)
    granted = max(0, min(wanted, int(tokens)))
    tokens -= granted
    write = _prepared(("rate-write", dialect), lambda: _rate_upsert(dialect))
    with db.covered(session):
        _run(session, write, {"api_key_id": api_key_id, "tokens": tokens, "stamp": now})
    wait = 0.0 if tokens >= 1 else (1.0 - tokens) / rate
    return SubmitTokens(granted, wait, held_for, shared_for)


def _later_of(dialect: str, *values: Any) -> Any:
    """The greatest of ``values`` (SQL): ``GREATEST`` on PostgreSQL, SQLite's scalar ``max``."""
    return func.greatest(*values) if dialect == "postgresql" else func.max(*values)


def _pace_mark(dialect: str, column: str) -> Any:
    """``INSERT … ON CONFLICT DO UPDATE`` of the key's :class:`SubmitPace` row setting ``column``
    to ``seconds`` from now (the database's clock), a later time already there kept."""
    until = _epoch_now(dialect) + bindparam("seconds", type_=Float())
    new = _dialect_insert(dialect, _SUBMIT_PACE).values({"api_key_id": bindparam("key"), column: until})
    there = func.coalesce(_SUBMIT_PACE.c[column], 0.0)
    return new.on_conflict_do_update(
        index_elements=[_SUBMIT_PACE.c.api_key_id],
        set_={column: _later_of(dialect, there, new.excluded[column])},
    )


def hold_submits(session: Session, api_key_id: str, seconds: float, *, wall: float) -> None:
    """fal answered a submit of the key with 429: hold every process's submits of the key back
    for ``seconds`` from now on the database's clock (``wall``: this process's epoch seconds,
    for SQLite). Dispatch rounds that read it (:func:`take_submit_tokens`) claim nothing while it
    holds, and the slots taken before a POST (:func:`take_pace_slot`) come after it. A pause
    already longer is kept (a shorter ``Retry-After`` heard later does not cut it short)."""
    dialect = session.connection().dialect.name
    statement = _prepared(("pace-hold", dialect), lambda: _pace_mark(dialect, "hold_until"))
    _run(session, statement, {"key": api_key_id, "seconds": max(0.0, float(seconds)), "wall": wall})


def share_pacing(session: Session, api_key_id: str, seconds: float, *, wall: float) -> None:
    """Another live process shares the database: every process without a limiter Redis takes
    its submits' slots from the key's :class:`SubmitPace` row (:func:`take_pace_slot`) for the
    next ``seconds`` (the database's clock; ``wall`` for SQLite). Never shortened; each process
    that still sees another renews it at its heartbeat, and it lapses when none does."""
    dialect = session.connection().dialect.name
    statement = _prepared(("pace-share", dialect), lambda: _pace_mark(dialect, "shared_until"))
    _run(session, statement, {"key": api_key_id, "seconds": float(seconds), "wall": wall})


def _pace_slot(dialect: str) -> Any:
    """:func:`take_pace_slot`'s statement: the slot is the latest of the key's next slot, the
    end of a 429's pause and now; it is taken (the next one moves an interval on) only when it
    comes within ``max_wait``, and it returns the seconds until it (no row: not taken). A key
    with no row yet gets one, its slot now.

    One statement, its times read once it holds the row: of two processes, the second waits
    for the first's lock, then sees its slot and reads the clock then (PostgreSQL evaluates
    ``ON CONFLICT DO UPDATE``'s ``WHERE`` and ``SET`` on the row it locked, each
    ``clock_timestamp()`` when it runs; on SQLite the bound ``wall`` is read once the
    transaction holds the write lock)."""
    clock = _epoch_now(dialect)
    interval = bindparam("interval", type_=Float())
    pace = _SUBMIT_PACE.c

    def slot() -> Any:
        return _later_of(
            dialect, func.coalesce(pace.pace_at, 0.0), func.coalesce(pace.hold_until, 0.0), clock
        )

    new = _dialect_insert(dialect, _SUBMIT_PACE).values(api_key_id=bindparam("key"), pace_at=clock + interval)
    return new.on_conflict_do_update(
        index_elements=[pace.api_key_id],
        set_={"pace_at": slot() + interval},
        where=slot() - clock <= bindparam("max_wait", type_=Float()),
    ).returning((pace.pace_at - interval - clock).label("wait"))


def _pace_wait(dialect: str) -> Any:
    """The seconds until the key's next slot (:func:`_pace_slot`, none taken)."""
    clock = _epoch_now(dialect)
    pace = _SUBMIT_PACE.c
    left = _later_of(
        dialect, func.coalesce(pace.pace_at, 0.0) - clock, func.coalesce(pace.hold_until, 0.0) - clock, 0.0
    )
    return select(left.label("wait")).where(pace.api_key_id == bindparam("key"))


def take_pace_slot(
    session: Session,
    api_key_id: str,
    *,
    interval: float,
    max_wait: float,
    wall: Callable[[], float] = time.time,
) -> tuple[bool, float]:
    """Take the key's next submit slot (:class:`SubmitPace` ``pace_at``, GCRA's theoretical arrival
    time, one ``interval`` apart whichever process takes it) if it comes within ``max_wait``
    seconds: ``(True, seconds until it)`` (sleep that long, then POST); else ``(False, seconds
    until the next slot)``, nothing taken. A 429's pause (:func:`hold_submits`) comes first.
    Times are the database's (PostgreSQL's clock; on SQLite ``wall()``, this process's epoch
    seconds, read once the transaction holds the database's write lock). Called in a
    transaction of its own, right before the POST, only while processes share the database's
    pacing (:func:`share_pacing`): one statement, on a row no dispatch round locks."""
    connection = session.connection()  # SQLite: the write lock is held from here (BEGIN IMMEDIATE)
    dialect = connection.dialect.name
    params = {"key": api_key_id, "interval": float(interval), "max_wait": float(max_wait), "wall": wall()}
    taken = _run(session, _prepared(("pace-slot", dialect), lambda: _pace_slot(dialect)), params).first()
    if taken is not None:
        return True, max(0.0, float(taken.wait))
    left = _run(session, _prepared(("pace-wait", dialect), lambda: _pace_wait(dialect)), params).first()
    return False, (max(0.0, float(left.wait)) if left is not None else float(interval))


def return_submit_tokens(session: Session, api_key_id: str, unused: int, *, capacity: float) -> None:
    """Give ``unused`` submits back to the key's shared bucket (:func:`take_submit_tokens`, same
    round): a round granted more than it had jobs for. Kept, they were lost to every other
    process — a run whose jobs are all at fal still dispatches at each completion, and would
    starve a second run of the rate it does not use. Not synced on its own, as the taking is
    not (:func:`jobs.db.covered`): lost to a power cut, the tokens were never taken either, or
    a later synced commit (a POST's :func:`record_send`) made both durable."""

    def build() -> Any:
        more = _SUBMIT_RATE.c.tokens + bindparam("unused", type_=Float())
        capped = case((more > bindparam("capacity", type_=Float()), bindparam("capacity")), else_=more)
        return update(_SUBMIT_RATE).where(_SUBMIT_RATE.c.api_key_id == bindparam("key")).values(tokens=capped)

    statement = _prepared(("rate-return",), build)
    with db.covered(session):
        _run(session, statement, {"key": api_key_id, "unused": float(unused), "capacity": float(capacity)})


def _rate_upsert(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (api_key_id) DO UPDATE`` replacing the bucket's state."""
    new = _dialect_insert(dialect, _SUBMIT_RATE)
    return new.on_conflict_do_update(
        index_elements=[_SUBMIT_RATE.c.api_key_id],
        set_={"tokens": new.excluded.tokens, "stamp": new.excluded.stamp},
    )


def dispatch_batches(session: Session, batch_ids: Collection[str] = ()) -> list[BatchRecord]:
    """:func:`scheduled_batches`, the simulated batches with work left, and the batches
    ``batch_ids``, in one query (a dispatch round's batches: those it may have to hold back —
    a round sends a simulated batch's jobs only when it works on that batch by name — and those
    it works on). Their columns as read (Core rows, not ORM objects: a round runs on every
    completion, and loading the batch as an object cost more than the rest of the round's reads)."""
    return list(_run(session, _held_back_query(simulated=True, whole=False), {"ids": sorted(batch_ids)}))


def batch_records(session: Session, batch_ids: Collection[str]) -> list[BatchRecord]:
    """The batches ``batch_ids`` as Core rows (every column but the manifest's text), in one
    query: those of the jobs a dispatch round claimed that :func:`dispatch_batches` did not
    read (a distributed leader works on every batch, so it knows its batches only from its
    claims). Loading each as an ORM object cost more than the claim itself."""
    if not batch_ids:
        return []

    def build() -> Any:
        return select(*_batch_columns()).where(Batch.id.in_(bindparam("ids", expanding=True)))

    return list(_run(session, _prepared(("batch_records",), build), {"ids": sorted(batch_ids)}))


def _batch_columns() -> list[Any]:
    """A batch's columns as a round reads them: all but the provenance (the manifest's text and
    a rerun's options, deferred on the model too; the text can be long and no round needs them)."""
    return [c for c in Batch.__table__.c if c.key not in ("manifest_text", "rerun_options")]


def _held_back_query(*, simulated: bool, whole: bool) -> Any:
    def build() -> Any:  # once per process: a dispatch round runs per completion
        held = [Batch.schedule.is_not(None), Batch.paused_by_user.is_(True)]
        if simulated:
            held.append(Batch.simulated.is_(True))
        return (
            (select(Batch) if whole else select(*_batch_columns()))
            .where(
                or_(
                    and_(or_(*held), _has_unfinished_jobs()),
                    Batch.id.in_(bindparam("ids", expanding=True)),
                )
            )
            .order_by(Batch.created_at, Batch.id)
        )

    return _prepared(("held_back_batches", simulated, whole), build)


def scheduled_batches(session: Session) -> list[Batch]:
    """Batches a dispatcher may have to hold back — those with a schedule or paused by their
    user — that still have work left.

    Every other batch is always sendable, and a finished one needs nothing more, so this stays
    a short list however long the database has lived: a nightly scheduled batch no longer adds a
    row to every dispatch round (one per completion) for good.
    """
    return list(session.scalars(_held_back_query(simulated=False, whole=True), {"ids": []}))


def cancelled_batches_with_work(session: Session) -> list[str]:
    """Ids of cancelled batches that still have jobs to end (unsent, or at fal), oldest first.

    The tick carries out ``wanbatch cancel`` for these; a cancelled batch whose jobs have all
    ended needs nothing more, however many of them the database holds.
    """
    query = _prepared(
        ("cancelled-with-work",),
        lambda: (
            select(Batch.id)
            .where(Batch.state == BatchState.CANCELLED, _has_unfinished_jobs())
            .order_by(Batch.created_at, Batch.id)
        ),
    )
    return [row[0] for row in _run(session, query)]
