"""Which database errors are an outage (:func:`jobs.db.is_unavailable`: wait, then try again) and
which say the database is not wanbatch's (:func:`jobs.db.is_schema_missing`: one line, no wait).

SQLite reports a missing table as an ``OperationalError``, the class of a locked or vanished
database, so "no such table" counted as an outage: a run waited for it for a whole lease and then
said the database had stopped answering. The errors here are the drivers' own.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from jobs import db
from jobs.db import make_engine


def _error_of(engine: Engine, sql: str) -> DBAPIError:
    with pytest.raises(DBAPIError) as raised, engine.connect() as conn:
        conn.execute(text(sql))
    return raised.value


def test_a_missing_table_is_no_outage(engine: Engine) -> None:
    """On both dialects: SQLite's ``no such table``, PostgreSQL's ``undefined_table``."""
    missing = _error_of(engine, "SELECT * FROM no_such_wanbatch_table")
    assert db.is_schema_missing(missing)
    assert not db.is_unavailable(missing)


def test_an_outage_is_still_one_and_other_errors_are_neither(engine: Engine) -> None:
    locked = OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked"))
    assert db.is_unavailable(locked)
    assert not db.is_schema_missing(locked)
    bad = _error_of(engine, "SELECT * FROM jobs WHERE")  # a bug in the statement
    assert not db.is_schema_missing(bad)


def test_a_damaged_sqlite_file_is_the_environments_not_a_bug(tmp_path: Path) -> None:
    """SQLite's own "database disk image is malformed" (``SQLITE_CORRUPT``), from a file one of
    whose pages is overwritten: what a read the disk failed for a moment can end as too (an
    ``EIO`` injected into one ``pread`` of a run did). An outage, waited out and said in one
    line, never an internal error; and the line a command ends with says how to recover."""
    path = tmp_path / "damaged.db"
    url = f"sqlite:///{path}"
    setup = sqlite3.connect(path)  # no write-ahead log: every page in the file
    with setup:
        setup.execute("CREATE TABLE t (x TEXT)")
        setup.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 2000)
    setup.close()
    damaged = bytearray(path.read_bytes())
    page = 4096 * 3
    damaged[page : page + 200] = b"\xff" * 200
    path.write_bytes(damaged)
    engine = make_engine(url)
    try:
        malformed = _error_of(engine, "SELECT count(*), sum(length(x)) FROM t")
    finally:
        engine.dispose()
    assert "malformed" in str(malformed.orig)
    assert db.is_unavailable(malformed)
    assert not db.is_schema_missing(malformed)
    line = str(db.failed_during_command_error(url, malformed))
    assert line.startswith(f"the database failed during the command ({path}): DatabaseError: database disk")
    assert "sqlite3 FILE .recover" in line


def test_an_integrity_error_is_still_no_outage(engine: Engine) -> None:
    """Only SQLite's corruption joins the outages: a constraint the data breaks does not."""
    with pytest.raises(DBAPIError) as raised, engine.begin() as conn:
        conn.execute(text("INSERT INTO batches (id) VALUES (NULL)"))
    assert not db.is_unavailable(raised.value)
