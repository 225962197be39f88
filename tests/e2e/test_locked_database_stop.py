"""Ctrl-C (SIGINT) or SIGTERM of `wanbatch run --simulate` while another process holds the SQLite
database's write lock (a transaction left open: a script, a second tool, `sqlite3` in a shell).

The bug (audit): SQLite's busy handler, which nothing interrupts, held every write of the run's
shutdown for its 30 s timeout — the heartbeat cleared, the leases given back, the simulator's
finished requests handed over, its claim released: minutes before the run exited, and warnings
along the way. Now a stopping process gives the lock up within a moment
(:func:`jobs.db.stop_waiting_for_lock`) and says so in one line: the jobs stay as recorded, and
the next run takes them over once this process has ended.

The PostgreSQL counterpart: another session's ``LOCK TABLE jobs IN SHARE MODE`` left open held a
stop for ever without a word; a stopping process's transactions now carry a short
``lock_timeout`` (never a running one's), and the line names that session.

The run is a real subprocess (signals need one) with its simulator's renders slowed to a minute,
so its jobs are at the simulator when the lock is taken; the lock is held by another real
process until the test lets it go, after the run has exited: no timing to guess.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text

from jobs import db
from tests.e2e.e2e_helpers import Background, MakeManifest, subprocess_env, wait_for

#: Runs the CLI with the embedded simulator's renders slowed to a minute.
SLOWED = """
import sys
sys.argv[0] = "wanbatch"
import falsim
started = falsim.running_simulator

def slow(options, *args, **kwargs):
    return started(options.updated({"latency_seconds": 60.0}), *args, **kwargs)

falsim.running_simulator = slow
from cli import main
main()
"""

#: Holds SQLite's write lock on the file it is given, says ``locked``, and keeps it until its
#: standard input closes.
HOLDER = (
    "import sqlite3, sys\n"
    "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)\n"
    "c.execute('BEGIN IMMEDIATE')\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)

MANIFEST = "name: lockstop\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
    f"  - prompt: locked database item {i}\n" for i in range(6)
)


class Slowed(Background):
    def command(self) -> list[str]:
        return [sys.executable, "-c", SLOWED]


def _at_simulator(path: Path) -> int:
    """How many jobs the database has at the simulator (0 while it cannot be read yet)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_is_not_held_by_another_process_s_lock_on_the_database(
    sig: signal.Signals, manifest: MakeManifest, e2e_env: Path, tmp_path: Path
) -> None:
    database = tmp_path / "wanbatch.db"
    env = subprocess_env("http://127.0.0.1:9", EMBEDDED_CONCURRENCY="4")
    argv = ["run", str(manifest("lockstop", MANIFEST)), "--simulate", "--no-progress"]
    run = Slowed(argv, env, e2e_env, "run")
    holder: subprocess.Popen[str] | None = None
    try:
        wait_for("jobs at the simulator", lambda: _at_simulator(database) >= 3, run)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(database)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        run.popen.send_signal(sig)
        code = run.wait(90)  # the lock is still held: the run ended without it
        assert holder.poll() is None
    finally:
        run.kill()
        if holder is not None:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(30)
    err = run.stderr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130, err
    assert "Traceback" not in err
    assert len(lines) == 1, err  # no warning from each part of the shutdown that met the lock
    assert lines[0].startswith("interrupted: nothing more is sent;"), err
    assert f"the database {database} is locked by another process" in lines[0], err
    assert "the next --simulate run takes them" in lines[0], err
    assert lines[0].endswith("run the same command again to resume"), err


# ------------------------------------------------------------------------------------ PostgreSQL


def _pg_at_simulator(url: str) -> int:
    """How many jobs the PostgreSQL database has at the simulator (0 while it cannot be read)."""
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()
    except psycopg.Error:
        return 0
    return int(row[0]) if row is not None else 0


@pytest.mark.postgres
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_is_not_held_by_another_session_s_postgresql_lock(
    sig: signal.Signals,
    manifest: MakeManifest,
    e2e_env: Path,
    new_pg_database: Callable[[], str],
) -> None:
    """The review's case: ``LOCK TABLE jobs IN SHARE MODE`` (what a plain ``CREATE INDEX`` takes)
    left open in another session held a stop of ``run`` for ever, without a word: giving the
    jobs back waited for it, and the hang watch took any answer to ``SELECT 1`` for a database
    that is not hung. The stop's transactions now wait a few seconds for it, and the run ends
    in one line naming that session; the lock stays held until after the run has exited."""
    url = new_pg_database()
    env = subprocess_env("http://127.0.0.1:9", url, EMBEDDED_CONCURRENCY="4")
    argv = ["run", str(manifest("pglockstop", MANIFEST)), "--simulate", "--no-progress"]
    run = Slowed(argv, env, e2e_env, "run")
    holder: psycopg.Connection[Any] | None = None
    try:
        wait_for("jobs at the simulator", lambda: _pg_at_simulator(url) >= 3, run)
        holder = psycopg.connect(url)
        holder.execute("LOCK TABLE jobs IN SHARE MODE")
        pid = holder.info.backend_pid
        # Given up whatever happens, so that a stop that waits for it fails the test, not hangs it.
        release = threading.Timer(150, holder.rollback)
        release.start()
        run.popen.send_signal(sig)
        code = run.wait(90)  # the lock is still held: the run ended without it
        assert release.is_alive()
        release.cancel()
    finally:
        run.kill()
        if holder is not None:
            holder.rollback()
            holder.close()
    err = run.stderr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 130, err
    assert "Traceback" not in err
    assert len(lines) == 1, err  # no warning from each part of the shutdown that met the lock
    assert lines[0].startswith("interrupted: nothing more is sent;"), err
    assert "is locked by another session, so this run did not wait to give its jobs back" in lines[0], err
    assert f"pid {pid} holds a SHARE lock on table jobs" in lines[0], err
    assert lines[0].endswith("run the same command again to resume"), err


@pytest.mark.postgres
def test_only_a_stopping_process_bounds_its_lock_waits(new_pg_database: Callable[[], str]) -> None:
    """Process-wide once stopping, on every thread; never before (a running process's own work
    waits for a lock as long as it takes), nor once the stop is undone."""
    url = new_pg_database()
    engine = db.make_engine(url, pool_size=1, max_overflow=0)

    def lock_timeout() -> str:
        seen: list[str] = []

        def read() -> None:  # on a thread of its own: the bound is not the context's
            with db.read_scope(engine) as session:
                seen.append(str(session.execute(text("SHOW lock_timeout")).scalar()))

        thread = threading.Thread(target=read)
        thread.start()
        thread.join(60)
        return seen[0]

    try:
        assert lock_timeout() == "0"
        db.stop_waiting_for_lock()
        try:
            assert lock_timeout() == f"{db.STOP_LOCK_WAIT_SECONDS:.0f}s"  # PostgreSQL shows 3000 ms so
            with db.session_scope(engine) as session:
                assert session.execute(text("SHOW statement_timeout")).scalar() == "0"
        finally:
            db.wait_for_lock_again()
        assert lock_timeout() == "0"
    finally:
        engine.dispose()
