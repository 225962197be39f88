"""A SQLite write that waits for the write lock another process holds: waited for while the
process works, given up within a moment once it stops (:func:`jobs.db.stop_waiting_for_lock`).

The bug (audit): SQLite's busy handler is C code nothing interrupts, so a stopping ``run`` whose
database another process held locked waited its whole busy timeout (30 s) in every write of its
shutdown. Now the writer engine's ``BEGIN IMMEDIATE`` waits in slices, tried again in Python,
and a stop is noticed between two tries.

Real SQLite, and a real second process holding ``BEGIN IMMEDIATE`` on the file until the test
lets it go: whether the write ended before the lock was released is then no matter of timing.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from jobs import db

#: Holds SQLite's write lock on the file it is given, says ``locked``, and keeps it until its
#: standard input closes.
HOLDER = (
    "import sqlite3, sys\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)\n"
    "c.execute('BEGIN IMMEDIATE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


class Holder:
    """Another process holding the write lock of a SQLite file until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    @property
    def holding(self) -> bool:
        return self.proc.poll() is None

    def release(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture
def file_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """A SQLite file with a table, on an engine whose writes would wait ten minutes for the lock
    (so a write that ends while the lock is held ended because it gave up, not because it timed
    out); no stop requested when the test starts or after it."""
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 600_000)
    db.wait_for_lock_again()
    path = tmp_path / "locked.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:  # WAL, as wanbatch's: reads go on
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (n int)")
        conn.commit()
    engine = db.make_engine(f"sqlite:///{path}")  # no connection yet: see _begins
    yield engine
    db.wait_for_lock_again()
    engine.dispose()


def _begins(engine: Engine) -> list[str]:
    """The ``BEGIN IMMEDIATE`` tries that reach SQLite on the writer's connections, as they come."""
    seen: list[str] = []

    @event.listens_for(db.writer_engine(engine), "connect")
    def _trace(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.set_trace_callback(
            lambda sql: seen.append(sql) if sql == "BEGIN IMMEDIATE" else None
        )

    return seen


def _write_in_thread(engine: Engine) -> tuple[threading.Thread, list[BaseException]]:
    failed: list[BaseException] = []

    def write() -> None:
        try:
            with db.session_scope(engine) as session:
                session.execute(text("INSERT INTO t VALUES (1)"))
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread, failed


def _until(what: str, check: Any, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_stop_ends_a_write_waiting_for_another_process_s_lock(file_engine: Engine, tmp_path: Path) -> None:
    begins = _begins(file_engine)
    holder = Holder(tmp_path / "locked.db")
    try:
        thread, failed = _write_in_thread(file_engine)
        _until("the write to wait for the lock", lambda: len(begins) >= 1)
        db.stop_waiting_for_lock()
        thread.join(60)
        assert not thread.is_alive(), "the write still waits for the lock after the stop"
        assert holder.holding  # it ended while the lock was held: it gave up
    finally:
        holder.release()
    assert len(failed) == 1, failed
    assert db.is_locked(failed[0]), failed
    assert db.gave_up_on_lock(failed[0]), failed
    with db.read_scope(file_engine) as session:
        assert session.execute(text("SELECT count(*) FROM t")).scalar() == 0


def test_without_a_stop_the_write_waits_through_its_slices_and_goes_through(
    file_engine: Engine, tmp_path: Path
) -> None:
    begins = _begins(file_engine)
    holder = Holder(tmp_path / "locked.db")
    try:
        thread, failed = _write_in_thread(file_engine)
        # Tried again and again while the lock is held, never failing meanwhile.
        _until("the write to try the lock three times", lambda: len(begins) >= 3)
        assert thread.is_alive()
        assert not failed, failed
    finally:
        holder.release()
    thread.join(60)
    assert not thread.is_alive()
    assert not failed, failed
    with db.read_scope(file_engine) as session:
        assert session.execute(text("SELECT count(*) FROM t")).scalar() == 1


def test_a_stopping_process_still_writes_when_nobody_holds_the_lock(file_engine: Engine) -> None:
    db.stop_waiting_for_lock()
    with db.session_scope(file_engine) as session:
        session.execute(text("INSERT INTO t VALUES (2)"))
    with db.read_scope(file_engine) as session:
        assert session.execute(text("SELECT count(*) FROM t")).scalar() == 1


def test_a_stopped_command_hands_its_caller_no_lock_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop's short lock waits are the stopped command's own: a program (a test) that ran
    it in process gets its normal waits back when :func:`cli.main` returns, never a later
    write of its own failing "database is locked" at once, or a PostgreSQL transaction
    bounded to 3 s, because an earlier command was stopped."""
    from cli import main

    monkeypatch.setattr(sys, "argv", ["wanbatch", "--version"])
    db.stop_waiting_for_lock()  # as a stopped command's signal handler leaves it
    try:
        with contextlib.suppress(SystemExit):
            main()
        assert not db._STOPPING.is_set()
    finally:
        db.wait_for_lock_again()
