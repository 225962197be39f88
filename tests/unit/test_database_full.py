"""What tells a full database disk apart, the line that says so, and the journal of accepted
submissions the database could not take (its file, its folders, what it trusts when read back)."""

from __future__ import annotations

import contextlib
import sqlite3
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import psycopg.errors
import pytest
from sqlalchemy.exc import OperationalError

from jobs import db
from worker.steps.unrecorded import Accepted, Journal, read_journal


def _sqlite_full() -> sqlite3.OperationalError:
    """SQLite's own SQLITE_FULL: a write past ``max_page_count``."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute("CREATE TABLE t (b BLOB)")
        conn.execute("PRAGMA max_page_count = 1")
        with pytest.raises(sqlite3.OperationalError) as raised:
            conn.execute("INSERT INTO t VALUES (zeroblob(100000))")
        return raised.value
    finally:
        conn.close()


def test_a_full_disk_is_told_apart_from_other_database_errors() -> None:
    full = _sqlite_full()
    assert str(full) == "database or disk is full"
    assert db.is_disk_full(full)
    assert db.is_disk_full(OperationalError("INSERT", {}, full))
    assert db.is_disk_full(OperationalError("INSERT", {}, psycopg.errors.DiskFull("could not extend file")))
    # Disk full is an outage too (the same work succeeds later), but not every outage is a full disk.
    assert db.is_unavailable(OperationalError("INSERT", {}, full))
    assert not db.is_disk_full(OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked")))
    assert not db.is_disk_full(OperationalError("INSERT", {}, psycopg.errors.AdminShutdown("terminating")))
    assert not db.is_disk_full(ValueError("database or disk is full"))


def test_the_line_names_where_to_free_space_and_never_a_password(tmp_path: Path) -> None:
    assert str(db.disk_full_error(f"sqlite:///{tmp_path}/wb.db")) == (
        f"the database's disk is full ({tmp_path}/wb.db): free space, then run the command again; "
        "nothing was changed"
    )
    line = str(db.disk_full_error("postgresql://render:hunter2@db.internal:5432/wanbatch", then="retry"))
    assert line == (
        "the database's disk is full (postgresql://render:***@db.internal:5432/wanbatch): free space on the "
        "database server, then retry"
    )


def _accepted(job_id: str = "a" * 32, request_id: str = "0b4f1c3e-5d6a-4b7c-8d9e-0f1a2b3c4d5e") -> Accepted:
    return Accepted(
        job_id=job_id,
        attempt=2,
        request_id=request_id,
        gateway_request_id=None,
        status_url="https://queue.fal.run/fal-ai/wan-22/requests/x/status",
        response_url=None,
        cancel_url=None,
        running=True,
        submitted_at=datetime(2026, 5, 1, 22, 14, 3, tzinfo=UTC),
    )


def test_a_journal_entry_reads_back_as_written_and_nothing_else_is_trusted() -> None:
    entry = _accepted()
    assert Accepted.from_json(entry.as_json()) == entry
    assert Accepted.from_json("not json") is None
    assert Accepted.from_json('{"job_id": "x"}') is None
    forged = entry.as_json().replace(entry.request_id, "../../other-request")
    assert Accepted.from_json(forged) is None  # not a request id's shape: never put in a URL
    naive = entry.as_json().replace("+00:00", "")
    assert Accepted.from_json(naive) is None


def test_the_journal_is_kept_in_the_first_folder_that_takes_it_and_removed_once_empty(tmp_path: Path) -> None:
    missing, second = tmp_path / "gone", tmp_path / "second"
    second.mkdir()
    journal = Journal(f"sqlite:///{tmp_path}/wb.db", folders=[missing, second])
    one, two = _accepted("a" * 32), _accepted("b" * 32, "1c5a2d4f-6e7b-4c8d-9e0f-1a2b3c4d5e6f")

    where = journal.save([one, two])
    assert where == second / journal.name
    assert stat.S_IMODE(where.stat().st_mode) == 0o600
    assert read_journal(where) == [one, two]
    assert journal.save([two]) == where
    assert read_journal(where) == [two]
    assert journal.save([]) is None
    assert list(second.iterdir()) == []
    # A folder that cannot take it at all: nowhere, said so (the caller logs the entries).
    assert Journal("sqlite:///x.db", folders=[missing]).save([one]) is None


def test_side_files_a_failed_open_left_are_removed_only_while_nobody_has_the_database_open(
    tmp_path: Path,
) -> None:
    """An empty ``-wal`` and a ``-shm`` of zero bytes (what an open on a full disk leaves) are
    removed, but not while another process holds the database (SQLite's shared lock on it), and
    never a file that holds something."""
    path = tmp_path / "wb.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    url = f"sqlite:///{path}"
    wal, shm = tmp_path / "wb.db-wal", tmp_path / "wb.db-shm"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "conn = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "conn.execute('BEGIN'); conn.execute('SELECT * FROM t').fetchall()\n"
            "print('holding', flush=True); sys.stdin.read()\n",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "holding\n"
        wal.write_bytes(b"")
        shm.write_bytes(b"\0\0\0")
        db._remove_open_debris(url, frozenset({"-wal", "-shm"}))
        assert wal.exists()
        assert shm.exists()
    finally:
        holder.communicate("", timeout=10)
    db._remove_open_debris(url, frozenset({"-wal"}))  # only what this open made
    assert not wal.exists()
    assert shm.exists()
    shm.write_bytes(b"\0\0\1")  # holds something
    db._remove_open_debris(url, frozenset({"-shm"}))
    assert shm.exists()
    shm.write_bytes(b"\0\0\0")
    db._remove_open_debris(url, frozenset({"-shm"}))
    assert not shm.exists()
