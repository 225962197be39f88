"""The SQLite log cannot be synced to disk (``fdatasync`` fails with ``EIO``): a command says so
in one line, exit 2, and a run sends every job once and finishes.

Found by injecting the error into a real run (``strace -e inject=fdatasync:error=EIO:when=N``):

* a command whose last commit's sync failed (``submit``, or the submit of ``run MANIFEST``)
  answered ``internal error: OperationalError: disk I/O error … please report it``, exit 70:
  a disk's failure reported as wanbatch's bug;
* a submit step whose send's record committed but whose sync then failed saw its record fail
  and made no POST, but the database read "its POST may be out": the job waited out its lease
  and failed ``submit_unknown``, "possibly billed", for a request fal never saw.

Each command runs as a real ``wanbatch`` process whose syncs of the log (:data:`jobs.db.sync_file`)
fail while a flag file exists, or, for the run, for the first send records' commits only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, db_rows, subprocess_env

JOBS = 6
ROOT = Path(__file__).resolve().parents[2]

#: ``python -c`` source: the command line, with every sync of the log failing while a flag exists.
SYNC_FAILS_WHILE_FLAGGED = """
import errno, os, sys
sys.path.insert(0, {root!r})
from jobs import db
real = db.sync_file
def sync(fd):
    if os.path.exists({flag!r}):
        raise OSError(errno.EIO, "Input/output error")
    real(fd)
db.sync_file = sync
from cli import main
main()
"""

#: ``python -c`` source: the command line, the syncs after the first ``{count}`` send records
#: (each in the thread that committed it) failing, as a disk's I/O error would.
SEND_RECORDS_FAIL = """
import errno, sys, threading
sys.path.insert(0, {root!r})
from jobs import db, store
real_sync, real_record = db.sync_file, store.record_send
armed, lock, left = threading.local(), threading.Lock(), [{count}]
def record_send(*args, **kwargs):
    taken = real_record(*args, **kwargs)
    with lock:
        if taken is not None and left[0] > 0:
            left[0] -= 1
            armed.on = True
    return taken
def sync(fd):
    if getattr(armed, "on", False):
        armed.on = False
        raise OSError(errno.EIO, "Input/output error")
    real_sync(fd)
db.sync_file, store.record_send = sync, record_send
from cli import main
main()
"""


def wanbatch(
    source: str, env: dict[str, str], cwd: Path, *args: str | Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", source, *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _manifest(manifest: MakeManifest, name: str, count: int = JOBS) -> Path:
    items = "\n".join(f"  - prompt: a lighthouse in the rain, number {i}" for i in range(count))
    return manifest(name, f"name: {name}\nendpoint: fal-ai/wan-22\nitems:\n{items}\n")


def test_a_command_whose_commit_cannot_be_synced_says_so_in_one_line_and_can_run_again(
    manifest: MakeManifest, sim: SimulatorHandle, e2e_env: Path, tmp_path: Path
) -> None:
    env = subprocess_env(sim.url)
    url = env["WANBATCH_DATABASE_URL"]
    flag = tmp_path / "log-cannot-sync"
    source = SYNC_FAILS_WHILE_FLAGGED.format(root=str(ROOT), flag=str(flag))
    assert wanbatch(source, env, e2e_env, "submit", _manifest(manifest, "first", count=2)).returncode == 0

    flag.touch()
    other = _manifest(manifest, "other")
    failed = wanbatch(source, env, e2e_env, "submit", other)
    assert failed.returncode == 2, failed.stderr
    assert failed.stdout == ""
    lines = failed.stderr.splitlines()
    assert len(lines) == 1, failed.stderr
    (line,) = lines
    assert line.startswith("error: the database failed during the command ("), line
    assert "disk I/O error" in line
    assert "Input/output error" in line
    assert "run the command again once the database answers" in line
    assert "internal error" not in line
    assert "report" not in line

    failed_json = wanbatch(source, env, e2e_env, "submit", other, "--json")
    assert failed_json.returncode == 2
    assert failed_json.stdout.startswith('{"ok": false, "error": "the database failed during the command')

    flag.unlink()
    again = wanbatch(source, env, e2e_env, "submit", other)
    assert again.returncode == 0, again.stderr
    # Stored whole or not at all before, and once now: the second batch has its jobs, once.
    assert db_rows(url, "SELECT count(*) FROM batches")[0][0] == 2
    assert db_rows(url, "SELECT count(*) FROM jobs")[0][0] == 2 + JOBS


def test_a_run_whose_send_records_cannot_be_synced_sends_each_job_once_and_finishes(
    manifest: MakeManifest, sim: SimulatorHandle, e2e_env: Path
) -> None:
    # A lease far longer than the run may take: the jobs come back because this process knows
    # it sent nothing, not because their leases lapsed.
    env = subprocess_env(sim.url, LEASE_SECONDS="600", MAX_OUTSTANDING="3", EMBEDDED_CONCURRENCY="3")
    source = SEND_RECORDS_FAIL.format(root=str(ROOT), count=3)
    done = wanbatch(source, env, e2e_env, "run", _manifest(manifest, "synced-late"), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "internal error" not in done.stderr
    assert "Traceback" not in done.stderr
    assert "the database is unavailable" in done.stderr  # the steps the failures ended, said
    assert "possibly billed" not in done.stdout + done.stderr
    rows = db_rows(
        env["WANBATCH_DATABASE_URL"],
        "SELECT state, attempts, possible_duplicate_charges FROM jobs ORDER BY id",
    )
    assert [(str(state), int(dup)) for state, _attempts, dup in rows] == [("succeeded", 0)] * JOBS
    ledger = sim.ledger()
    assert ledger["billed_count"] == JOBS  # one request a job: nothing paid twice
    assert len(ledger["entries"]) == JOBS


#: ``python -c`` source: the command line, the first call of ``{module}.{name}`` failing with the
#: error ``{error}`` builds (its marker line on stderr first, to show it did fail).
FIRST_CALL_FAILS = """
import sqlite3, sys
sys.path.insert(0, {root!r})
from sqlalchemy.exc import DBAPIError
import {module} as patched
real, calls = patched.{name}, [0]
def first_fails(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 1:
        print({marker!r}, file=sys.stderr)
        raise {error}
    return real(*args, **kwargs)
patched.{name} = first_fails
from cli import main
main()
"""

#: SQLite's words for a read its disk could not make (an ``EIO`` injected into one ``pread`` of
#: a run ended so): "database disk image is malformed", ``SQLITE_CORRUPT``.
MALFORMED = (
    'DBAPIError.instance("SELECT", {}, type("Corrupt", (sqlite3.DatabaseError,), '
    '{"sqlite_errorcode": 11, "sqlite_errorname": "SQLITE_CORRUPT"})("database disk image is malformed"), '
    "sqlite3.Error)"
)
#: psycopg's words for a connection the server closed.
CONNECTION_LOST = (
    'DBAPIError.instance("SELECT", {}, sqlite3.OperationalError("the connection is lost"), sqlite3.Error)'
)


def first_call_fails(module: str, name: str, error: str, marker: str) -> str:
    return FIRST_CALL_FAILS.format(root=str(ROOT), module=module, name=name, error=error, marker=marker)


def test_a_run_waits_out_a_read_sqlite_calls_malformed(
    manifest: MakeManifest, sim: SimulatorHandle, e2e_env: Path
) -> None:
    """Was ``internal error: DatabaseError: database disk image is malformed; please report it``,
    exit 70, the run stopped: SQLite's ``SQLITE_CORRUPT`` was no outage."""
    env = subprocess_env(sim.url)
    source = first_call_fails("jobs.store", "batch_estimated_usd", MALFORMED, "read failed: malformed")
    done = wanbatch(source, env, e2e_env, "run", _manifest(manifest, "read-once-malformed"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "internal error" not in done.stderr
    assert "read failed: malformed" in done.stderr  # it did fail the run's read
    rows = db_rows(env["WANBATCH_DATABASE_URL"], "SELECT state FROM jobs")
    assert [str(state) for (state,) in rows] == ["succeeded"] * JOBS


def test_a_run_whose_work_is_done_waits_out_a_failed_look_at_its_videos(
    manifest: MakeManifest, sim: SimulatorHandle, e2e_env: Path
) -> None:
    """Was ``error: the database failed during the command …`` (exit 2; before that, ``internal
    error``) after every job had succeeded: the look at the videos on disk that follows the run
    was the one read of its report not waited out (found by a connection reset injected there)."""
    env = subprocess_env(sim.url)
    source = first_call_fails("jobs.outputs_on_disk", "look", CONNECTION_LOST, "look failed: connection lost")
    done = wanbatch(source, env, e2e_env, "run", _manifest(manifest, "looked-at-late"), "--no-progress")
    assert "look failed: connection lost" in done.stderr  # it did fail once
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the database is unavailable (OperationalError: the connection is lost)" in done.stderr
    assert f"{JOBS}/{JOBS} done" in done.stdout
