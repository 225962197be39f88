"""The timeline's high-water mark (``clock_marks``) is written when it moves enough to matter,
not at every tick; a backward step of the clock is still caught up, once.

The cost (issue #11): on SQLite each tick raised the mark, a write transaction (and a WAL sync)
every second while a ``run`` only waited at fal for 60-150 s renders. Now a tick asks the
database only when the time left the window around the mark as its process last saw it that
cannot change the answer: a step back, or past the mark by ``MARK_SLACK_SECONDS``.

Real SQLite; this host's clock is played by :data:`jobs.clock.host_time`, moved by hand, and the
statements the ticks run are counted (no timing).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, update

from jobs import clock, db
from jobs.models import ClockMark, Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.steps.context import Runtime
from worker.steps.tick import catch_up_with_clock_step

#: The simulated host clock (epoch seconds), moved by the tests.
_NOW = [0.0]


@pytest.fixture(autouse=True)
def _played_clock() -> Iterator[None]:
    """This host's clock is :data:`_NOW`, starting at the true time; put back afterwards."""
    real = clock.host_time
    clock.reset()
    _NOW[0] = time.time()
    clock.host_time = lambda: _NOW[0]
    yield
    clock.host_time = real
    clock.reset()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'wanbatch.db'}")
    db.migrate(engine)
    yield engine
    engine.dispose()


class _Statements:
    """Counts the statements every engine runs, and those that write the mark (listening on the
    class: the steps may run on an engine derived from the test's, with its own options)."""

    def __init__(self) -> None:
        self.all = 0
        self.mark_writes = 0

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.all += 1
        text = statement.lstrip().upper()
        if "CLOCK_MARKS" in text and not text.startswith("SELECT"):
            self.mark_writes += 1


@pytest.fixture
def counted() -> Iterator[_Statements]:
    statements = _Statements()
    event.listen(Engine, "before_cursor_execute", statements)
    yield statements
    event.remove(Engine, "before_cursor_execute", statements)


def _runtime(engine: Engine, batch: str) -> Runtime:
    return make_runtime(engine, settings_for("https://queue.test", "k-mark"), batch_ids=frozenset({batch}))


def _ticks(rt: Runtime, seconds: int) -> None:
    """A tick's catch-up every second for ``seconds`` seconds, the clock going forward."""
    for _ in range(seconds):
        _NOW[0] += 1.0
        assert catch_up_with_clock_step(rt) == 0


def _mark(engine: Engine) -> Any:
    with db.read_scope(engine) as session:
        return session.execute(select(ClockMark.high_water)).scalar_one()


def test_waiting_ticks_write_the_mark_only_when_it_moves_enough(
    sqlite_engine: Engine, counted: _Statements
) -> None:
    batch = add_batch(sqlite_engine, "one", [("fal-ai/wan-22", {"prompt": "p"})])
    rt = _runtime(sqlite_engine, batch)
    catch_up_with_clock_step(rt)  # the run's first tick: the mark is there
    counted.all = counted.mark_writes = 0
    _ticks(rt, 120)
    # Every tick wrote it (120); now once each time the clock passed it by the slack.
    most = int(120 // clock.MARK_SLACK_SECONDS) + 1
    assert counted.mark_writes <= most, f"{counted.mark_writes} writes of the mark in 120 ticks"
    assert counted.all <= 3 * most  # the ticks in between ask the database nothing
    # ... and the mark still follows the clock, within the slack.
    behind = (utcnow() - _mark(sqlite_engine)).total_seconds()
    assert 0 <= behind <= clock.MARK_SLACK_SECONDS


def test_a_step_back_past_a_stale_mark_is_still_caught_up_once(sqlite_engine: Engine) -> None:
    """The worst case for detection: the mark as stale as the slack lets it be. A step back of
    more than ``STEP_SECONDS`` + ``MARK_SLACK_SECONDS`` is caught up, by at least the step less
    the slack, and once: a second process (its own view of the mark, now stale) finds the mark
    lowered and moves nothing again."""
    one = add_batch(sqlite_engine, "one", [("fal-ai/wan-22", {"prompt": "p"})])
    two = add_batch(sqlite_engine, "two", [("fal-ai/wan-22", {"prompt": "q"})])
    run_a, run_b = _runtime(sqlite_engine, one), _runtime(sqlite_engine, two)
    catch_up_with_clock_step(run_a)
    catch_up_with_clock_step(run_b)
    written = _mark(sqlite_engine)
    # Up to the slack later, nothing written since: the mark is as far behind as it gets.
    _NOW[0] += clock.MARK_SLACK_SECONDS
    assert catch_up_with_clock_step(run_a) == 0
    assert catch_up_with_clock_step(run_b) == 0
    assert _mark(sqlite_engine) == written
    (job,) = job_ids(sqlite_engine, one)
    due = utcnow() + timedelta(seconds=30)
    with db.session_scope(sqlite_engine) as session:
        waiting = {"state": JobState.RETRY_WAIT, "next_attempt_at": due}
        session.execute(update(Job).where(Job.id == job).values(**waiting))
    step = clock.STEP_SECONDS + clock.MARK_SLACK_SECONDS + 1.0
    _NOW[0] -= step  # NTP steps this host's clock back
    assert catch_up_with_clock_step(run_a) == 1
    assert catch_up_with_clock_step(run_b) == 0  # caught up already: not moved twice
    with db.read_scope(sqlite_engine) as session:
        at = session.execute(select(Job.next_attempt_at).where(Job.id == job)).scalar_one()
    assert at is not None
    moved = (due - at).total_seconds()
    assert step - clock.MARK_SLACK_SECONDS <= moved <= step + 0.001
    # The clock goes on from there: nothing more is moved, and the mark follows it again.
    _ticks(run_a, 30)
    _ticks(run_b, 30)
    assert (utcnow() - _mark(sqlite_engine)).total_seconds() <= clock.MARK_SLACK_SECONDS
