"""A pooled PostgreSQL connection is pinged only when it sat idle (:func:`jobs.db._ping_after_idle`).

``pool_pre_ping`` pinged before every unit of work. Now a connection used a moment ago goes out
as it is; one idle for longer than :data:`jobs.db.PING_AFTER_IDLE_SECONDS` is pinged, and a dead
one is replaced without the caller seeing an error, as the pre-ping did. The real server: the
connection is killed with ``pg_terminate_backend``, as a restart or a dropped socket kills it.

How long a connection sat idle is read on :mod:`jobs.db`'s monotonic clock, which the tests move
themselves (:class:`_Clock`): a checkout a moment after the last one stays a moment after it
however loaded the machine is (real sleeps against a 0.2 s threshold were a race).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError

from jobs import db

pytestmark = pytest.mark.postgres


class _Clock:
    """:mod:`jobs.db`'s ``time``, but for a monotonic clock that only the test moves."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def idle(self) -> None:
        """As if the pool's connection sat unused for longer than the idle threshold."""
        self.now += 2 * db.PING_AFTER_IDLE_SECONDS

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    moved = _Clock()
    monkeypatch.setattr(db, "time", moved)
    return moved


@pytest.fixture
def pinged(pg_url: str, clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Engine, list[int]]]:
    """An engine as wanbatch makes it, with a list that grows at every ping it sends."""
    engine = db.make_engine(pg_url, pool_size=1, max_overflow=0)
    pings: list[int] = []
    real_ping = engine.dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        pings.append(1)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counting_ping)
    yield engine, pings
    engine.dispose()


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(pg_url: str, pid: int) -> None:
    """Kill backend ``pid``, and wait until it is gone (once it handled the signal)."""
    admin = create_engine(db.normalize_url(pg_url), isolation_level="AUTOCOMMIT")  # no stats snapshot kept
    try:
        with admin.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
            deadline = time.monotonic() + 15
            alive = text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
            while conn.execute(alive, {"pid": pid}).scalar_one():
                assert time.monotonic() < deadline, f"backend {pid} outlived pg_terminate_backend"
                time.sleep(0.01)
    finally:
        admin.dispose()


def test_a_connection_in_use_a_moment_ago_is_not_pinged(
    pinged: tuple[Engine, list[int]], clock: _Clock
) -> None:
    engine, pings = pinged
    first = _backend_pid(engine)  # a new connection: never pinged
    for _ in range(20):
        clock.now += db.PING_AFTER_IDLE_SECONDS / 2  # back in the pool for half the threshold
        assert _backend_pid(engine) == first
    assert pings == []


def test_an_idle_connection_is_pinged_and_a_dead_one_replaced_without_an_error(
    pinged: tuple[Engine, list[int]], pg_url: str, clock: _Clock
) -> None:
    engine, pings = pinged
    first = _backend_pid(engine)
    clock.idle()
    assert _backend_pid(engine) == first  # idle: pinged, alive, kept
    assert len(pings) == 1

    _terminate(pg_url, first)
    clock.idle()
    second = _backend_pid(engine)  # pinged, found dead, replaced: the caller sees nothing
    assert second != first
    assert len(pings) == 2
    assert _backend_pid(engine) == second  # the new one is not pinged
    assert len(pings) == 2


def test_a_connection_killed_within_the_idle_second_fails_once_then_the_pool_recovers(
    pinged: tuple[Engine, list[int]], pg_url: str
) -> None:
    """The trade made for the saved pings, pinned down: such a connection fails its next
    statement once (as one dying mid-statement does), and the pool connects anew after it."""
    engine, pings = pinged
    first = _backend_pid(engine)
    _terminate(pg_url, first)
    with pytest.raises(OperationalError) as failed:
        _backend_pid(engine)
    assert failed.value.connection_invalidated
    assert db.is_unavailable(failed.value)  # what the run's loops wait out (worker.db_outage)
    assert _backend_pid(engine) != first
    assert pings == []
