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


class _Clock:
    """A monotonic clock a test moves on by hand (:class:`worker.ticker.LeaderWatch`'s)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _migrated(new_pg_database: Callable[[], str]) -> tuple[str, Engine]:
    from jobs.db import migrate

    url = new_pg_database()
    engine = make_engine(url)
    migrate(engine, from_models=False)
    return url, engine


def _leader_beats(engine: Engine, at_seconds: int) -> None:
    from datetime import UTC, datetime, timedelta

    from jobs import db, store
    from jobs.models import EVERY_BATCH

    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=at_seconds)
    with db.session_scope(engine) as session:
        store.record_heartbeat(session, "host-a:101:MainThread", [EVERY_BATCH], at)


def test_a_silent_leader_is_ended_taken_over_and_steps_down(
    new_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    """A leader whose beat stands still (frozen: its session, and the lock, live on) is ended by
    a follower after ``silent_after`` of the follower's own clock; one whose beat moves is not.
    The old leader's next check finds its session gone and steps down, in one warning."""
    url, first = _migrated(new_pg_database)
    second = make_engine(url)
    leader, follower = LeaderLock(first), LeaderLock(second, silent_after=35.0)
    clock = _Clock()
    follower._watch.clock = clock
    try:
        assert leader.acquire()
        _leader_beats(first, 0)
        with caplog.at_level(logging.INFO, logger="worker.ticker"):
            follower.watch_leader()  # first look
            clock.now += 30.0
            _leader_beats(first, 10)  # it beats: alive
            follower.watch_leader()
            clock.now += 34.0
            follower.watch_leader()  # silent for 34 s: not yet
            assert not follower.held
            assert leader.acquire()
            clock.now += 1.0
            follower.watch_leader()  # 35 s: ended, and taken over
            assert follower.acquire()  # it holds the lock now
            assert not leader.acquire()  # it wakes: its lock session is gone
            assert not leader.acquire()  # and the lock is another's
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 2, warnings
        assert "the tick leader host-a:101 (database backend pid " in warnings[0]
        assert "has not beaten for 35s while holding the leader lock" in warnings[0]
        assert "ended its lock session; this worker takes over" in warnings[0]
        assert "lost the leader lock" in warnings[1]
        assert "stepping down" in warnings[1]
        assert "unavailable" not in warnings[1]
    finally:
        leader.release()
        follower.release()
        first.dispose()
        second.dispose()


def test_a_role_that_may_not_end_the_leader_says_so_once_and_goes_on(
    new_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    """The leader connects as a superuser, the follower as an ordinary role: PostgreSQL refuses
    it ``pg_terminate_backend`` of a superuser's session. One warning, no traceback, no change."""
    import uuid

    url, first = _migrated(new_pg_database)
    role = f"wanbatch_t_role_{uuid.uuid4().hex[:8]}"
    _admin(f"CREATE ROLE {role} LOGIN")
    second = make_engine(url.replace("postgres@", f"{role}@", 1))
    leader, follower = LeaderLock(first), LeaderLock(second, silent_after=35.0)
    clock = _Clock()
    follower._watch.clock = clock
    try:
        assert leader.acquire()
        _leader_beats(first, 0)
        name = url.rsplit("/", 1)[1]
        _admin_in(url, f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        _admin(f'GRANT CONNECT ON DATABASE "{name}" TO {role}')
        with caplog.at_level(logging.INFO, logger="worker.ticker"):
            for _ in range(3):
                follower.watch_leader()
                clock.now += 40.0
        assert not follower.held
        assert leader.acquire()  # still leading
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "may not end its session" in warnings[0].getMessage()
        assert warnings[0].exc_info is None
    finally:
        leader.release()
        follower.release()
        first.dispose()
        second.dispose()
        _admin_in(url, f"DROP OWNED BY {role}")
        _admin(f"DROP ROLE IF EXISTS {role}")


def _admin_in(url: str, sql: str) -> None:
    """``sql`` as the admin, in the test's own database (``DROP OWNED`` is per database)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def test_a_leader_frozen_in_a_dispatch_round_has_that_round_ended_too(
    new_pg_database: Callable[[], str], caplog: pytest.LogCaptureFixture
) -> None:
    """Frozen mid-round, the leader holds the dispatch round's lock on a connection of its pool:
    ended with its lock session, or the successor's first round would wait for it for ever."""
    import time

    from jobs import store

    url, first = _migrated(new_pg_database)
    second = make_engine(url)
    leader, follower = LeaderLock(first), LeaderLock(second, silent_after=1.0)
    clock = _Clock()
    follower._watch.clock = clock
    round_conn = psycopg.connect(url, connect_timeout=5)  # the frozen leader's round, left open
    try:
        assert leader.acquire()
        _leader_beats(first, 0)
        round_conn.execute("SELECT pg_advisory_xact_lock(%s)", (store.DISPATCH_LOCK_KEY,))
        follower.watch_leader()
        clock.now += 1.0
        time.sleep(1.2)  # the round's transaction idle for longer than silent_after, by the server's clock
        with caplog.at_level(logging.INFO, logger="worker.ticker"):
            follower.watch_leader()
        assert follower.acquire()
        assert any("also ended the frozen leader's dispatch round" in r.getMessage() for r in caplog.records)
        with pytest.raises(psycopg.OperationalError):
            round_conn.execute("SELECT 1")
    finally:
        round_conn.close()
        leader.release()
        follower.release()
        first.dispose()
        second.dispose()
