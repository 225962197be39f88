"""The first line of what an error says is put one way, in one place
(:func:`jobs.printable.first_line`, :func:`jobs.printable.named_first_line`).

It was about fifteen copies, each slightly different: some unwrapped SQLAlchemy's ``.orig``, some
escaped control characters, some fell back to the type's name, some cut at 200 or 300
characters; a log line quoting a Redis or PostgreSQL server's words unescaped let those words
forge log lines or drive the operator's terminal.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
import redis
from sqlalchemy.exc import OperationalError

from jobs import db
from jobs.printable import first_line, named_first_line

ROOT = Path(__file__).resolve().parents[2]

HOSTILE = "refused \x1b]0;owned\x07\there\rand\u2028on\u202eevil"
HOSTILE_SHOWN = "refused \\x1b]0;owned\\x07\\there\\x0dand\\u2028on\\u202eevil"


class AdminShutdown(Exception):
    """Stands for a driver's own error type (psycopg's ``AdminShutdown``)."""


def _wrapped(orig: BaseException) -> OperationalError:
    return OperationalError("UPDATE jobs SET state = ? WHERE id = ?", ("queued", "j1"), orig)


def test_the_first_line_of_several() -> None:
    assert first_line(ValueError("  first line  \nsecond line\nthird")) == "first line"
    assert named_first_line(ValueError("first line\nsecond")) == "ValueError: first line"


@pytest.mark.parametrize("said", ["", "   ", "\n\n  \n"])
def test_the_type_when_it_says_nothing(said: str) -> None:
    assert first_line(ValueError(said)) == "ValueError"
    assert named_first_line(ValueError(said)) == "ValueError"
    assert first_line(TimeoutError()) == "TimeoutError"


def test_what_the_driver_said_when_sqlalchemy_wrapped_it() -> None:
    wrapped = _wrapped(AdminShutdown("terminating connection due to administrator command\nHINT: later"))
    assert first_line(wrapped) == "terminating connection due to administrator command"
    assert named_first_line(wrapped) == "AdminShutdown: terminating connection due to administrator command"
    # The driver's type when it said nothing, not SQLAlchemy's.
    assert first_line(_wrapped(AdminShutdown())) == "AdminShutdown"
    assert named_first_line(_wrapped(sqlite3.OperationalError(""))) == "OperationalError"
    assert "[SQL:" in str(wrapped)  # what the unwrapping leaves out


def test_control_characters_are_escaped_and_only_a_line_feed_ends_the_line() -> None:
    assert first_line(ValueError(f"{HOSTILE}\nsecond")) == HOSTILE_SHOWN
    assert named_first_line(_wrapped(AdminShutdown(HOSTILE))) == f"AdminShutdown: {HOSTILE_SHOWN}"


def test_a_limit_cuts_before_escaping() -> None:
    assert first_line(ValueError("x" * 500), limit=10) == "x" * 10
    assert first_line(ValueError("ab\x1bcd"), limit=3) == "ab\\x1b"  # no escape cut in half
    assert named_first_line(ValueError("abcdef\nmore"), limit=3) == "ValueError: abc"
    assert first_line(ValueError("short"), limit=300) == "short"


def test_the_database_problem_is_the_named_first_line() -> None:
    wrapped = _wrapped(sqlite3.OperationalError("database is locked\n[SQL: …]"))
    assert db.database_problem(wrapped) == named_first_line(wrapped) == "OperationalError: database is locked"


def test_a_bugs_summary_is_one_inert_line() -> None:
    from worker.crash import summary

    assert summary(RuntimeError(f"{HOSTILE}\nTraceback …")) == f"RuntimeError: {HOSTILE_SHOWN}"
    assert summary(RuntimeError("y" * 400)) == f"RuntimeError: {'y' * 300}"
    assert summary(KeyError()) == "KeyError"


def test_a_brokers_words_in_a_log_line_are_escaped() -> None:
    from worker.broker_outage import broker_problem

    said = broker_problem(redis.exceptions.ConnectionError(f"Error 111 {HOSTILE}\nmore"))
    assert said == f"ConnectionError: Error 111 {HOSTILE_SHOWN}"


def test_a_limiters_reason_is_escaped_and_keeps_no_password() -> None:
    from worker.limits import _reason

    url = "redis://:s3cret@127.0.0.1:1/0"
    refused = redis.exceptions.ResponseError(f"ERR s3cret \x1b[2J. script: {'a' * 40}, on line 3\nx")
    said = _reason(refused, url)
    assert said == "ERR ** \\x1b[2J"
    assert _reason(redis.exceptions.ConnectionError(""), url) == "ConnectionError"


#: The idiom every copy used: ``str(exc).strip().splitlines()``, with or without ``.orig``.
_COPY = re.compile(r"str\((getattr\(\w+, \"orig\", None\) or )?\w+\)\.strip\(\)\.splitlines\(\)")


def test_one_place_takes_an_errors_first_line() -> None:
    copies = sorted(
        str(path.relative_to(ROOT))
        for folder in ("jobs", "worker", "web", "cli", "falsim")
        for path in (ROOT / folder).rglob("*.py")
        if _COPY.search(path.read_text(encoding="utf-8"))
    )
    assert copies == []
