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

Submits still on their way to fal at the stop (a loaded machine: the other jobs' POSTs) are
waited for, up to ``WANBATCH_READ_TIMEOUT``, even with the database locked, and said in a line of
their own before the last: the answers cannot be recorded then, but they are kept in the journal
of :mod:`worker.steps.unrecorded`, which the next run records — each job sent, and billed, once.
Not waiting would leave those jobs without a request id, for the next run to fail
``submit_unknown`` after a lease though fal billed them (``test_submits_in_flight_…``).
"""

from __future__ import annotations

import re
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

from falsim.faults import FaultRule
from jobs import db
from tests.e2e.e2e_helpers import Background, MakeManifest, db_rows, subprocess_env, wait_for

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

#: Runs the CLI with every submit's answer held for :data:`HELD_SECONDS` by its simulator (the
#: requests are queued at once: fal has them, and bills them), and renders slowed to a minute.
HELD = """
import dataclasses, sys
sys.argv[0] = "wanbatch"
import falsim
started = falsim.running_simulator

def held(options, *args, **kwargs):
    return started(dataclasses.replace(options, latency_seconds=60.0, faults=FAULTS), *args, **kwargs)

falsim.running_simulator = held
from cli import main
main()
"""

#: Long enough for the test to see every submit thread's POST under way and stop the run before
#: the first answer comes, however loaded the machine; well within ``WANBATCH_READ_TIMEOUT``.
HELD_SECONDS = 20.0

#: The line a stop says before its last when submits were on their way (worker.running
#: ``_wait_for_answers``); the count is whatever was in flight at that moment.
WAITING = re.compile(
    r"waiting for [1-9]\d* submit\(s\) already sent to fal to be answered \(up to 60s; Ctrl-C again to "
    r"exit now: fal may have accepted and billed them, and their outcome is settled after "
    r"WANBATCH_LEASE_SECONDS \(120s\)\)"
)

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


class Held(Background):
    def command(self) -> list[str]:
        faults = {"submit_slow": FaultRule(probability=1.0, params={"delay": HELD_SECONDS})}
        return [sys.executable, "-c", f"from falsim.faults import FaultRule\nFAULTS = {faults!r}\n{HELD}"]


def _last_line(err: str) -> str:
    """The line a stopped run ends with: the only one, or the one after the line that says the
    stop waits for the answers of submits already sent (those the run had in flight, which a
    loaded machine may leave at any stop: that wait is right even with the database locked)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    # no warning from each part of the shutdown that met the lock
    assert len(lines) == 1 or (len(lines) == 2 and WAITING.fullmatch(lines[0])), err
    return lines[-1]


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
    assert code == 130, err
    last = _last_line(err)
    assert last.startswith("interrupted: nothing more is sent;"), err
    assert f"the database {database} is locked by another process" in last, err
    assert "the next --simulate run takes them" in last, err
    assert last.endswith("run the same command again to resume"), err


# ------------------------------------------------------------------------------------ PostgreSQL


def _pg_count(url: str, where: str) -> int:
    """How many jobs of the PostgreSQL database match ``where`` (0 while it cannot be read: the
    run has not made its tables yet)."""
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            row = conn.execute(f"SELECT count(*) FROM jobs WHERE {where}").fetchone()
    except psycopg.Error:
        return 0
    return int(row[0]) if row is not None else 0


def _pg_at_simulator(url: str) -> int:
    """How many jobs the PostgreSQL database has at the simulator (0 while it cannot be read)."""
    return _pg_count(url, "state IN ('queued', 'running')")


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
    env["TMPDIR"] = str(e2e_env)  # where a journal of submissions kept goes: the test's, not /tmp
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
    assert code == 130, err
    last = _last_line(err)
    assert last.startswith("interrupted: nothing more is sent;"), err
    assert "is locked by another session, so this run did not wait to give its jobs back" in last, err
    assert f"pid {pid} holds a SHARE lock on table jobs" in last, err
    assert last.endswith("run the same command again to resume"), err


@pytest.mark.postgres
def test_submits_in_flight_at_a_stop_with_the_database_locked_are_waited_for_and_kept(
    manifest: MakeManifest, e2e_env: Path, new_pg_database: Callable[[], str]
) -> None:
    """CI (loaded): a stop under another session's lock came with submits still on their way to
    fal. Waiting for their answers (up to ``WANBATCH_READ_TIMEOUT``) is right even though the
    database cannot record them: they are kept in the journal, named in the last line, and the
    next run records them — each job sent, and billed, once; none left to fail
    ``submit_unknown``. Here every submit's answer is held by the simulator, so the four submit
    threads' POSTs are all in flight when the lock is taken and the run stopped."""
    url = new_pg_database()
    env = subprocess_env("http://127.0.0.1:9", url, EMBEDDED_CONCURRENCY="4")
    env["TMPDIR"] = str(e2e_env)  # where a journal of submissions kept goes: the test's, not /tmp
    path = manifest("pglockheld", MANIFEST)
    run = Held(["run", str(path), "--simulate", "--no-progress"], env, e2e_env, "run")
    in_flight = "state = 'submitting' AND submitted_input IS NOT NULL"
    holder: psycopg.Connection[Any] | None = None
    try:
        wait_for("4 POSTs in flight", lambda: _pg_count(url, in_flight) == 4, run)
        holder = psycopg.connect(url)
        holder.execute("LOCK TABLE jobs IN SHARE MODE")
        release = threading.Timer(150, holder.rollback)
        release.start()
        run.popen.send_signal(signal.SIGTERM)
        # The answers come after HELD_SECONDS; the stop then gives up the lock within seconds.
        code = run.wait(HELD_SECONDS + 60)
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
    assert len(lines) == 2, err
    assert WAITING.fullmatch(lines[0]), err
    assert lines[0].startswith("waiting for 4 submit(s)"), err
    last = lines[1]
    assert "is locked by another session, so this run did not wait to give its jobs back" in last, err
    assert "4 accepted submission(s) could not be recorded (fal has them, and bills them)" in last, err
    assert "the next run on this host records them (none is sent again)" in last, err
    assert last.endswith("run the same command again to resume"), err
    named = dict(re.findall(r"job (\w+) \(attempt 1\): request ([\w-]+)", last))
    journal = re.search(r"kept in (\S+\.jsonl):", last)
    assert len(named) == 4, err
    assert journal is not None, err
    unrecorded = "SELECT id FROM jobs WHERE submitted_input IS NOT NULL AND request_id IS NULL"
    assert {row[0] for row in db_rows(url, unrecorded)} == set(named)

    second = Background(["run", str(path), "--simulate", "--no-progress"], env, e2e_env, "second")
    assert second.wait(120) == 0, second.stderr() + second.stdout()
    rows = db_rows(url, "SELECT id, state, attempts, request_id, error_type FROM jobs")
    assert len(rows) == 6
    assert all(
        state == "succeeded" and attempts == 1 and error is None for _, state, attempts, _, error in rows
    )
    recorded = {job: request for job, _, _, request, _ in rows}
    assert {job: recorded[job] for job in named} == named  # fal's ids, not a second submit
    assert not Path(journal.group(1)).exists()


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
