"""The store's kept statements run straight on the driver (:func:`jobs.store.direct.run_reusable`), SQLite's
and psycopg's: the same rows, values and errors as SQLAlchemy's own execution, on both dialects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

import pytest
from sqlalchemy import Engine, Table, bindparam, event, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, NoResultFound

from jobs.models import Job, JobEvent
from jobs.states import JobState
from jobs.store.direct import DirectResult, run_reusable
from tests.step_runtime import add_batch, job_ids

JOBS = cast(Table, Job.__table__)
EVENTS = cast(Table, JobEvent.__table__)

#: Kept for the test session, as the store keeps its statements (their compiled form is cached
#: under their identity).
MOVE = (
    update(JOBS)
    .where(JOBS.c.id == bindparam("w_id"), JOBS.c.version == bindparam("w_version"))
    .values(
        state=bindparam("v_state", type_=JOBS.c.state.type),
        next_attempt_at=bindparam("v_next", type_=JOBS.c.next_attempt_at.type),
        submitted_input=bindparam("v_input", type_=JOBS.c.submitted_input.type),
        actual_usd=bindparam("v_usd", type_=JOBS.c.actual_usd.type),
        seed=bindparam("v_seed", type_=JOBS.c.seed.type),
        version=JOBS.c.version + 1,
    )
    .returning(
        JOBS.c.state,
        JOBS.c.next_attempt_at,
        JOBS.c.submitted_input,
        JOBS.c.actual_usd,
        JOBS.c.seed,
        JOBS.c.version,
    )
)
SUMS = select(
    func.count().label("n"),
    func.coalesce(func.sum(JOBS.c.est_usd), Decimal(0)).label("usd"),
    func.max(JOBS.c.next_attempt_at).label("latest"),
).where(JOBS.c.batch_id == bindparam("batch_id"), JOBS.c.state == bindparam("state", type_=JOBS.c.state.type))
ONE_JOB = select(JOBS.c.id, JOBS.c.state).where(JOBS.c.id == bindparam("job_id"))
SOME_JOBS = select(JOBS.c.id).where(JOBS.c.id.in_(bindparam("ids", expanding=True))).order_by(JOBS.c.id)
ADD_EVENT = insert(EVENTS)
#: An expanding list bound at execution used twice, an enum list, and a list written into the
#: statement (SQLAlchemy makes that one expanding too).
IN_LISTS = (
    select(JOBS.c.id, JOBS.c.state)
    .where(
        JOBS.c.id.in_(bindparam("ids", expanding=True)),
        JOBS.c.state.in_(bindparam("states", expanding=True)),
        JOBS.c.state.not_in([JobState.FAILED, JobState.CANCELLED]),
        or_(JOBS.c.id.in_(bindparam("ids", expanding=True)), JOBS.c.id.is_(None)),
    )
    .order_by(JOBS.c.id)
)


def _plain(rows: Any) -> list[dict[str, Any]]:
    return [dict(row._mapping) for row in rows]


def test_a_move_returns_what_sqlalchemy_would_read_back(engine: Engine) -> None:
    """Every kind of column the store writes — an enum, an aware timestamp, JSON, money, a big
    integer — goes in and comes back as SQLAlchemy's own execution writes and reads it."""
    batch_id = add_batch(engine, "direct", [("fal-ai/wan-22", {"prompt": "a"})])
    (job_id,) = job_ids(engine, batch_id)
    due = datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=UTC)
    params = {
        "w_id": job_id,
        "w_version": 0,
        "v_state": JobState.RETRY_WAIT,
        "v_next": due,
        "v_input": {"prompt": "a", "nested": [1, 2.5, None]},
        "v_usd": Decimal("0.40"),
        "v_seed": 2**64 - 1,
    }
    with engine.begin() as conn:
        result = run_reusable(conn, MOVE, params)
        assert isinstance(result, DirectResult)  # the driver's cursor, on either database
        direct = result.one()
        assert direct.version == 1
        assert direct.state == JobState.RETRY_WAIT
        assert direct.next_attempt_at == due
        assert direct.next_attempt_at.tzinfo is not None
        # The same move again through SQLAlchemy reads the row the direct one wrote.
        again = conn.execute(MOVE, params | {"w_version": 1}).one()
    assert _plain([direct]) == [dict(again._mapping) | {"version": 1}]
    assert list(direct) == [again[i] if i != 5 else 1 for i in range(6)]


def test_a_query_gives_the_same_rows_both_ways(engine: Engine) -> None:
    batch_id = add_batch(engine, "sums", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(3)])
    params = {"batch_id": batch_id, "state": JobState.PENDING}
    ids = job_ids(engine, batch_id)
    with engine.begin() as conn:
        assert _plain(run_reusable(conn, SUMS, params)) == _plain(conn.execute(SUMS, params))
        assert run_reusable(conn, SUMS, params).scalar() == 3
        row = run_reusable(conn, SUMS, params).one()
        assert (row.n, row.usd) == (3, Decimal("0.75"))
        assert [r.id for r in run_reusable(conn, SOME_JOBS, {"ids": ids[:2]})] == sorted(ids[:2])


def test_an_in_list_runs_directly_with_the_same_rows(engine: Engine) -> None:
    """``IN`` lists — bound at execution, or written into the statement, typed (an enum), used
    twice — are expanded as SQLAlchemy expands them; an empty one is left to SQLAlchemy."""
    batch_id = add_batch(engine, "in-lists", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(4)])
    ids = job_ids(engine, batch_id)
    with engine.begin() as conn:
        conn.execute(update(JOBS).where(JOBS.c.id == ids[0]).values(state=JobState.QUEUED))
        for chosen in (ids[:1], ids[1:], ids, ids[::-1], ids[:1]):  # lengths 1, 3, 4, the cached one again
            params = {"ids": chosen, "states": [JobState.PENDING, JobState.QUEUED]}
            result = run_reusable(conn, IN_LISTS, params)
            assert isinstance(result, DirectResult)
            rows = result.all()
            assert _plain(rows) == _plain(conn.execute(IN_LISTS, params))
            assert [r.id for r in rows] == sorted(chosen)
        only_pending = {"ids": ids, "states": [JobState.PENDING]}
        assert [r.id for r in run_reusable(conn, IN_LISTS, only_pending)] == sorted(ids[1:])
        empty = {"ids": [], "states": [JobState.PENDING]}
        result = run_reusable(conn, IN_LISTS, empty)
        assert not isinstance(result, DirectResult)  # SQLAlchemy's "empty set" expression
        assert result.all() == []


def test_one_and_first_answer_as_sqlalchemy_does(engine: Engine) -> None:
    with engine.begin() as conn:
        assert run_reusable(conn, ONE_JOB, {"job_id": "none"}).first() is None
        assert run_reusable(conn, ONE_JOB, {"job_id": "none"}).scalar() is None
        with pytest.raises(NoResultFound):
            run_reusable(conn, ONE_JOB, {"job_id": "none"}).one()


def test_an_insert_is_compiled_for_the_columns_given(engine: Engine) -> None:
    """An INSERT without values is compiled per set of columns, as SQLAlchemy compiles it; a
    refused row raises SQLAlchemy's error (the store's callers catch those), not the driver's."""
    batch_id = add_batch(engine, "events", [("fal-ai/wan-22", {"prompt": "a"})])
    (job_id,) = job_ids(engine, batch_id)
    now = datetime.now(UTC)
    full = {
        "job_id": job_id,
        "at": now,
        "from_state": JobState.PENDING,
        "to_state": JobState.SUBMITTING,
        "version": 1,
        "reason": "attempt 1",
        "details": {"why": "test"},
        "worker": "me",
    }
    with engine.begin() as conn:
        run_reusable(conn, ADD_EVENT, full)
        run_reusable(conn, ADD_EVENT, {k: v for k, v in full.items() if k not in ("details", "worker")})
        rows = conn.execute(
            select(EVENTS.c.at, EVENTS.c.details, EVENTS.c.worker, EVENTS.c.to_state)
            .where(EVENTS.c.job_id == job_id)
            .order_by(EVENTS.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [
        (now, {"why": "test"}, "me", JobState.SUBMITTING),
        (now, None, None, JobState.SUBMITTING),
    ]
    with pytest.raises(IntegrityError), engine.begin() as conn:  # no such job: the foreign key
        run_reusable(conn, ADD_EVENT, full | {"job_id": "missing"})


def test_statement_listeners_still_see_every_statement(engine: Engine) -> None:
    """A connection with cursor listeners (the tests that count a step's statements) runs the
    kept statements through SQLAlchemy, so none goes unseen."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with engine.begin() as conn:
            run_reusable(conn, ONE_JOB, {"job_id": "none"}).first()
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert any("FROM jobs" in s for s in seen)


def test_timestamps_keep_their_order_as_text(engine: Engine) -> None:
    """SQLite compares the stored text: the direct path writes it exactly as SQLAlchemy does,
    so a due-time comparison means the same whichever path wrote the row."""
    batch_id = add_batch(engine, "order", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(2)])
    first, second = job_ids(engine, batch_id)
    base = datetime(2026, 12, 1, 23, 59, 59, 999999, tzinfo=UTC)
    common = {"v_state": JobState.RETRY_WAIT, "v_input": None, "v_usd": None, "v_seed": None, "w_version": 0}
    with engine.begin() as conn:
        run_reusable(conn, MOVE, common | {"w_id": first, "v_next": base})
        conn.execute(MOVE, common | {"w_id": second, "v_next": base + timedelta(microseconds=1)})
        due = conn.execute(
            select(JOBS.c.id).where(JOBS.c.next_attempt_at <= base).where(JOBS.c.batch_id == batch_id)
        ).all()
        stored = conn.execute(
            select(func.count()).where(JOBS.c.batch_id == batch_id, JOBS.c.next_attempt_at > base)
        ).scalar()
    assert [r.id for r in due] == [first]
    assert stored == 1


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # PostgreSQL's path only
def test_a_lost_postgresql_connection_is_invalidated_as_sqlalchemy_does(engine: Engine) -> None:
    """A server that drops the connection mid-statement: the direct path hands the error to
    SQLAlchemy's own handling, so it is a DBAPIError that says the connection was invalidated
    (what :func:`jobs.db.is_unavailable` and the outage handling go by) and the pool does not
    hand that dead connection out again."""
    with engine.connect() as other, engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        other.commit()
        with pytest.raises(DBAPIError) as raised:
            run_reusable(conn, ONE_JOB, {"job_id": "none"})
        assert raised.value.connection_invalidated
        assert conn.invalidated
        conn.rollback()  # what a unit of work's scope does on its way out
    with engine.begin() as conn:  # a fresh connection from the pool answers
        assert run_reusable(conn, ONE_JOB, {"job_id": "none"}).first() is None


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # PostgreSQL's path only
def test_postgresql_outside_a_transaction_goes_through_sqlalchemy(engine: Engine) -> None:
    """A connection with no transaction begun: SQLAlchemy's ``execute`` begins one (autobegin),
    so it runs the statement rather than the driver's cursor behind SQLAlchemy's back."""
    with engine.connect() as conn:
        result = run_reusable(conn, ONE_JOB, {"job_id": "none"})
        assert not isinstance(result, DirectResult)
        assert conn.in_transaction()
        assert isinstance(run_reusable(conn, ONE_JOB, {"job_id": "none"}), DirectResult)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # PostgreSQL's path only
def test_postgresql_rows_are_read_without_describing_each_column(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psycopg builds a ``Column`` object per column on every read of ``cursor.description``:
    the direct path takes the type codes from the result itself, so a statement costs no column
    objects, and its rows (a ``NUMERIC`` read through its type code, a timestamp, an empty
    result, an update that returns nothing) are still the ones SQLAlchemy reads."""
    import psycopg

    built = 0
    original = psycopg.Column.__init__

    def counting(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal built
        built += 1
        original(self, *args, **kwargs)

    batch_id = add_batch(engine, "described", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(2)])
    ids = job_ids(engine, batch_id)
    params = {"batch_id": batch_id, "state": JobState.PENDING}
    plain_update = update(JOBS).where(JOBS.c.id == bindparam("w_id")).values(seed=bindparam("v_seed"))
    with engine.begin() as conn:
        expected = _plain(conn.execute(SUMS, params))
        expected_some = _plain(conn.execute(SOME_JOBS, {"ids": ids}))
        monkeypatch.setattr(psycopg.Column, "__init__", counting)
        sums, some = run_reusable(conn, SUMS, params), run_reusable(conn, SOME_JOBS, {"ids": ids})
        none = run_reusable(conn, ONE_JOB, {"job_id": "none"})
        updated = run_reusable(conn, plain_update, {"w_id": ids[0], "v_seed": 7})
        monkeypatch.undo()
    assert isinstance(sums, DirectResult)
    assert isinstance(updated, DirectResult)
    assert built == 0
    assert _plain(sums) == expected
    assert expected[0]["usd"] == Decimal("0.50")
    assert _plain(some) == expected_some
    assert none.all() == []
    assert (updated.all(), updated.rowcount) == ([], 1)
