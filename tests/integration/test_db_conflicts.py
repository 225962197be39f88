"""A transaction the database ended to break a conflict with another process's is run again, not
fatal: an embedded ``run`` sharing PostgreSQL with the workers' leader used to end with exit 70
("deadlock detected") when both applied the statuses of the same requests in another order.
Real conflicts on the real servers, made here on purpose."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError

from jobs import db
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, completion_heard, job_ids, make_runtime, settings_for
from worker.conductor import Conductor
from worker.steps import dispatch, submit
from worker.steps.poll import apply_seen_in

KEY = "db-conflicts-key-7d1e"


def _deadlock(new_pg_database: Callable[[], str]) -> DBAPIError:
    """Two PostgreSQL transactions that each wait for the other's row: the server ends one."""
    engine = create_engine(new_pg_database())
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE rows (id int PRIMARY KEY, n int)"))
        conn.execute(text("INSERT INTO rows VALUES (1, 0), (2, 0)"))
    errors: list[DBAPIError] = []
    both_hold = threading.Barrier(2)

    def one(first: int, second: int) -> None:
        try:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
                conn.execute(text("UPDATE rows SET n = n + 1 WHERE id = :id"), {"id": first})
                both_hold.wait(timeout=10)
                conn.execute(text("UPDATE rows SET n = n + 1 WHERE id = :id"), {"id": second})
        except DBAPIError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=pair) for pair in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    engine.dispose()
    assert len(errors) == 1, errors  # exactly one was chosen as the victim
    return errors[0]


def _locked(tmp_path: Path) -> DBAPIError:
    """SQLite's "database is locked": a writer that finds another's write lock, without waiting."""
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    holder = create_engine(url, connect_args={"isolation_level": None})
    waiter = create_engine(url, connect_args={"isolation_level": None, "timeout": 0})
    with holder.connect() as conn:
        conn.exec_driver_sql("CREATE TABLE t (n int)")
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            with waiter.connect() as other, pytest.raises(DBAPIError) as caught:
                other.exec_driver_sql("BEGIN IMMEDIATE")
        finally:
            conn.exec_driver_sql("ROLLBACK")
    holder.dispose()
    waiter.dispose()
    return caught.value


def test_deadlocks_and_busy_locks_are_transient_conflicts_other_errors_are_not(
    new_pg_database: Callable[[], str], tmp_path: Path
) -> None:
    assert db.is_transient_conflict(_deadlock(new_pg_database))
    assert db.is_transient_conflict(_locked(tmp_path))
    engine = create_engine(new_pg_database())
    try:
        with engine.connect() as conn, pytest.raises(DBAPIError) as caught:
            conn.execute(text("SELECT * FROM no_such_table"))
    finally:
        engine.dispose()
    assert not db.is_transient_conflict(caught.value)
    assert not db.is_transient_conflict(RuntimeError("database is locked"))


def test_an_embedded_conductor_goes_on_after_a_conflict_and_still_ends_on_a_bug(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY, output_dir=tmp_path / "out"))
    conductor = Conductor(rt, stream=False)
    conflict = _locked(tmp_path)
    rounds: list[int] = []

    def conflicted_once(*_args: Any) -> None:
        rounds.append(1)
        if len(rounds) == 1:
            raise conflict

    monkeypatch.setattr(conductor, "_loop", conflicted_once)
    conductor.run(threading.Event(), resilient=False)  # returns: the second round ended the run
    assert len(rounds) == 2

    def broken(*_args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(conductor, "_loop", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        conductor.run(threading.Event(), resilient=False)


def test_statuses_move_their_jobs_in_job_id_order_whatever_order_they_were_heard_in(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "out", max_outstanding=3))
    batch_id = add_batch(
        engine, "order", [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in "abc"]
    )
    ids = job_ids(engine, batch_id)
    assert sorted(dispatch(rt)) == sorted(ids)
    for job_id in ids:
        assert submit(rt, job_id) == "submitted"
    heard = sorted((completion_heard(engine, rt, j) for j in ids), key=lambda s: s.job_id, reverse=True)
    moved: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        # SQLite: an UPDATE; PostgreSQL: WITH moved AS (UPDATE jobs …) INSERT INTO job_events …
        if "UPDATE JOBS" in statement.upper() and isinstance(params, dict | tuple | list):
            values = params.values() if isinstance(params, dict) else params
            moved.extend(v for v in values if v in ids)

    writer = db.writer_engine(engine)
    event.listen(writer, "before_cursor_execute", record)
    try:
        with db.session_scope(engine) as session:
            apply_seen_in(session, rt, heard)
    finally:
        event.remove(writer, "before_cursor_execute", record)
    assert moved == sorted(ids)
