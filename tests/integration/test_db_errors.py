"""Which database errors are an outage (:func:`jobs.db.is_unavailable`: wait, then try again) and
which say the database is not wanbatch's (:func:`jobs.db.is_schema_missing`: one line, no wait).

SQLite reports a missing table as an ``OperationalError``, the class of a locked or vanished
database, so "no such table" counted as an outage: a run waited for it for a whole lease and then
said the database had stopped answering. The errors here are the drivers' own.
"""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from jobs import db


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
