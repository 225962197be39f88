"""Which failures of an accepted submission's record are waited for, and which are left to the
journal at once (:func:`worker.steps.unrecorded.passes_by_waiting`), with SQLite's own errors.

Before, only an ``OperationalError`` was caught at all: a corrupt file (``DatabaseError``), a
refused constraint (``IntegrityError``), a value too big (``DataError``) lost the request id."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from jobs import db
from worker.steps.unrecorded import passes_by_waiting, refused_words


def _error(url: str, *statements: str) -> DBAPIError:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    except DBAPIError as exc:
        return exc
    finally:
        engine.dispose()
    pytest.fail("the database took it")


def test_a_corrupt_file_is_not_waited_for(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not a database at all, " * 200)
    exc = _error(f"sqlite:///{corrupt}", "SELECT * FROM jobs")
    assert not passes_by_waiting(exc)
    assert (
        refused_words(exc, "test") == "the database refused the write (DatabaseError: file is not a database)"
    )


def test_a_constraint_is_not_waited_for(tmp_path: Path) -> None:
    exc = _error(
        f"sqlite:///{tmp_path / 'c.db'}",
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, n INTEGER CHECK (n < 10))",
        "INSERT INTO jobs (n) VALUES (11)",
    )
    assert not passes_by_waiting(exc)
    assert refused_words(exc, "test").startswith(
        "the database refused the write (IntegrityError: CHECK constraint failed"
    )


def test_a_missing_column_is_not_waited_for(tmp_path: Path) -> None:
    """SQLite says it as it says an outage (an ``OperationalError``)."""
    exc = _error(
        f"sqlite:///{tmp_path / 'm.db'}", "CREATE TABLE jobs (id INTEGER)", "UPDATE jobs SET fal_origin = 1"
    )
    assert db.is_unavailable(exc)
    assert not passes_by_waiting(exc)


def test_a_full_database_is_waited_for(tmp_path: Path) -> None:
    exc = _error(
        f"sqlite:///{tmp_path / 'f.db'}",
        "PRAGMA max_page_count = 2",
        "CREATE TABLE jobs (body TEXT)",
        "INSERT INTO jobs VALUES (printf('%.50000c', 'x'))",
    )
    assert db.is_disk_full(exc)
    assert passes_by_waiting(exc)


def test_a_bug_is_said_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    said = refused_words(KeyError("status_url"), "test-bug")
    (crash,) = tmp_path.glob("wanbatch-crash-*.txt")
    assert said == f"a bug: KeyError: 'status_url' (please report it; details in {crash})"
    assert not passes_by_waiting(KeyError("status_url"))
