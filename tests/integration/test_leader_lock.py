"""The tick leader's lock (:class:`worker.ticker.LeaderLock` over :class:`jobs.db.AdvisoryLock`).

One worker leads at a time; a leader that lets go (a worker shutting down while its process
lives on) hands leadership over at once, not when its process exits. A lock whose connection the
server killed is one warning line, no traceback (an expected event), and is taken again at the
next try; anything else that fails keeps its traceback (a bug).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import psycopg
import pytest
from sqlalchemy import Engine

from jobs.db import make_engine
from tests.conftest import PG_ADMIN_DSN
from worker.ticker import LeaderLock


def test_one_leader_at_a_time_and_a_release_hands_over(new_pg_database: Callable[[], str]) -> None:
    url = new_pg_database()
    first, second = make_engine(url), make_engine(url)
    one, other = LeaderLock(first), LeaderLock(second)
    try:
        assert one.acquire()
        assert one.acquire()  # still ours
        assert not other.acquire()
        one.release()
        assert other.acquire()
        assert not one.acquire()
    finally:
        one.release()
        other.release()
        first.dispose()
        second.dispose()


def test_on_sqlite_every_ticker_leads(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        assert LeaderLock(engine).acquire()
        assert LeaderLock(engine).acquire()
    finally:
        engine.dispose()


def _admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def _close(url: str, *, closed: bool) -> None:
    """Close this test's database to new connections (or open it again) and, closing, terminate
    every backend connected to it (no other database's)."""
    name = url.rsplit("/", 1)[1]
    _admin(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(not closed).lower()}')
    if closed:
        _admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        )


def _own_engine(new_pg_database: Callable[[], str]) -> tuple[str, Engine]:
    url = new_pg_database()
    return url, make_engine(url)


def test_a_killed_lock_connection_is_one_line_without_traceback_and_retried(
    new_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    """Was a warning with the driver's full traceback, at every try while the database was away."""
    url, engine = _own_engine(new_pg_database)
    lock = LeaderLock(engine)
    try:
        assert lock.acquire()
        _close(url, closed=True)
        with caplog.at_level(logging.DEBUG, logger="worker.ticker"):
            assert not lock.acquire()  # the check on the killed connection fails: not leading
            assert not lock.acquire()  # nor can a new connection take it: the same outage
        lost = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lost) == 1, caplog.text  # one line per outage, then debug lines
        assert lost[0].exc_info is None
        assert "AdminShutdown: terminating connection" in lost[0].getMessage()
        assert "stops leading" in lost[0].getMessage()
        _close(url, closed=False)
        assert lock.acquire()  # the database answers again: leading again
    finally:
        _close(url, closed=False)
        lock.release()
        engine.dispose()


def test_a_lock_failing_for_another_reason_keeps_its_traceback(
    new_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _url, engine = _own_engine(new_pg_database)
    lock = LeaderLock(engine)

    def bug() -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(lock._lock, "acquire", bug)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.ticker"):
            assert not lock.acquire()
        (failed,) = caplog.records
        assert failed.levelno == logging.ERROR
        assert failed.exc_info is not None
        assert isinstance(failed.exc_info[1], RuntimeError)
    finally:
        lock.release()
        engine.dispose()
