"""On SQLite every unit of work of a process writes on one connection, whose page cache no other
connection of the process empties (:func:`jobs.db._add_writer`); reads keep their own."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine, QueuePool, func, select, text

from jobs import db, store
from jobs.db import make_engine, migrate
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids


def _dbapi(session: Any) -> int:
    return id(session.connection().connection.dbapi_connection)


def _engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'writer.db'}")
    migrate(engine)
    return engine


def test_every_unit_of_work_writes_on_the_same_connection(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    seen: set[int] = set()
    lock = threading.Lock()

    def write() -> None:
        for _ in range(5):
            with db.session_scope(engine) as session:
                with lock:
                    seen.add(_dbapi(session))
                store.record_heartbeat(session, "me", frozenset({"*"}), utcnow())

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 1
    engine.dispose()


def test_a_read_runs_beside_an_open_write(tmp_path: Path) -> None:
    """A read does not wait for the writer connection: it reads its own snapshot (WAL), and
    sees the write once it commits."""
    engine = _engine(tmp_path)
    batch_id = add_batch(engine, "beside", [("fal-ai/wan-22", {"prompt": "a"})])
    (job_id,) = job_ids(engine, batch_id)
    count = select(func.count()).select_from(Job).where(Job.state == JobState.CANCELLED)
    with db.session_scope(engine) as writing:
        store.cancel_unsent_jobs(writing, [batch_id], reason="test", error="test", error_type="cancelled")
        with db.read_scope(engine) as reading:
            assert _dbapi(reading) != _dbapi(writing)
            assert reading.execute(count).scalar() == 0  # not committed yet
    with db.read_scope(engine) as reading:
        assert reading.execute(count).scalar() == 1
        assert store.get_job(reading, job_id).state == JobState.CANCELLED
    engine.dispose()


def test_writes_on_the_engine_itself_still_take_turns_with_it(tmp_path: Path) -> None:
    """``engine.begin()`` (not a unit of work) shares the in-process write lock with the writer
    connection: interleaved from two threads, every write lands, none meets "database is locked"."""
    engine = _engine(tmp_path)
    errors: list[BaseException] = []

    def units() -> None:
        try:
            for _ in range(30):
                with db.session_scope(engine) as session:
                    store.record_heartbeat(session, "units", frozenset({"*"}), utcnow())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def plain() -> None:
        try:
            for i in range(30):
                with engine.begin() as conn, db.session_factory(engine)(bind=conn) as session:
                    store.record_heartbeat(session, f"plain-{i}", frozenset({"*"}), utcnow())
                    session.flush()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=units), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    engine.dispose()


def test_disposing_the_engine_closes_the_writer(tmp_path: Path) -> None:
    """The writer connection stays open between units of work, until the engine is disposed of."""
    engine = _engine(tmp_path)
    writer = db.writer_engine(engine)
    assert writer is not engine
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "me", frozenset({"*"}), utcnow())
        assert session.connection().engine is writer
    pool = cast(QueuePool, writer.pool)
    assert pool.checkedout() == 1  # kept for the next unit of work
    engine.dispose()
    assert pool.checkedout() == 0
    assert pool.checkedin() == 0


def test_a_unit_of_work_inside_a_begun_one_is_refused(tmp_path: Path) -> None:
    """Both would write on the one connection: the inner one would join the outer transaction."""
    engine = _engine(tmp_path)
    with db.session_scope(engine) as outer:
        store.record_heartbeat(outer, "outer", frozenset({"*"}), utcnow())
        with pytest.raises(RuntimeError, match="inside another"), db.session_scope(engine):
            pass
    with db.session_scope(engine) as before:  # an outer unit that has not begun: the inner one runs
        with db.session_scope(engine) as inner:
            store.record_heartbeat(inner, "inner", frozenset({"*"}), utcnow())
        store.record_heartbeat(before, "after", frozenset({"*"}), utcnow())
    with db.read_scope(engine) as reading:
        assert set(reading.scalars(text("SELECT owner FROM conductor_heartbeats"))) >= {
            "outer",
            "inner",
            "after",
        }
    engine.dispose()


def test_a_failed_unit_leaves_the_connection_ready_for_the_next(tmp_path: Path) -> None:
    engine = _engine(tmp_path)

    def fails() -> None:
        with db.session_scope(engine) as session:
            store.record_heartbeat(session, "lost", frozenset({"*"}), utcnow())
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fails()
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "kept", frozenset({"*"}), utcnow())
    with db.read_scope(engine) as reading:
        names = set(reading.scalars(text("SELECT owner FROM conductor_heartbeats")))
    assert "kept" in names
    assert "lost" not in names
    engine.dispose()
