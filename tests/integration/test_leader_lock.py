"""The tick leader's lock (:class:`worker.ticker.LeaderLock` over :class:`jobs.db.AdvisoryLock`).

One worker leads at a time; a leader that lets go (a worker shutting down while its process
lives on) hands leadership over at once, not when its process exits.
"""

from __future__ import annotations

from collections.abc import Callable

from jobs.db import make_engine
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
