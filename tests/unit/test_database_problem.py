"""What a log line quotes of a database error is put one way, in one place
(:func:`jobs.db.database_problem`): the driver's error type and the first line of its words.

It was two helpers of the same name: the conductor's, the steps' and the dashboard's
(``worker.db_outage``: ``OperationalError: database is locked``) and the webhook receiver's
(``worker.steps.webhooks``: ``database is locked``, without the type, and without escaping).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy.exc import OperationalError

from jobs import db

ROOT = Path(__file__).resolve().parents[2]


def _failed(said: str) -> OperationalError:
    statement = "UPDATE jobs SET state = ? WHERE id = ?"
    return OperationalError(statement, ("queued", "j1"), sqlite3.OperationalError(said))


def test_the_type_and_the_first_line_without_the_statement() -> None:
    said = db.database_problem(_failed("database is locked\n[SQL: UPDATE jobs ...]"))
    assert said == "OperationalError: database is locked"


def test_what_the_database_quotes_stays_on_its_line_and_inert() -> None:
    said = db.database_problem(_failed("invalid value \x1b]0;owned\x07\there"))
    assert said == "OperationalError: invalid value \\x1b]0;owned\\x07\\there"


def test_the_type_alone_when_the_database_said_nothing() -> None:
    assert db.database_problem(_failed("")) == "OperationalError"
    assert db.database_problem(TimeoutError()) == "TimeoutError"


def test_one_place_formats_a_database_error() -> None:
    defined = sorted(
        str(path.relative_to(ROOT))
        for folder in ("jobs", "worker", "web", "cli")
        for path in (ROOT / folder).rglob("*.py")
        if "def database_problem(" in path.read_text(encoding="utf-8")
    )
    assert defined == ["jobs/db.py"]
