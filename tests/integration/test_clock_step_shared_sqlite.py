"""A backward step of the host's clock moves each wait once, however many processes share the
SQLite file.

The bug (audit "clock-review"): on SQLite the timeline is this host's clock, and each ticking
process noticed a backward step of it on its own and brought every wait forward by the step.
Two processes on one file (two ``wanbatch run``s of different batches, or a run and a worker)
moved the waits twice: after a 1 h step a retry set due in 30 s was due at once, an hour early
(and a ``submit_unknown`` proof deadline could pass early: a resend policy could pay twice).

Now the timeline's high-water mark is kept in the database (``clock_marks``), and the tick that
finds its time well before it moves the waits and lowers the mark in one ``BEGIN IMMEDIATE``
transaction: the other process finds nothing to do. Real processes (the step is noticed per
process), real SQLite; each child reads this host's clock with a shift kept in a file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from jobs import db, store
from jobs.models import ClockMark, Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids

ROOT = Path(__file__).resolve().parents[2]
#: Longest a child may take before the test calls it hung.
DEADLINE = 120.0

CHILD = r"""
import sys, time
from pathlib import Path
from jobs import clock, db
here, name, batch_id, url = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
real = time.time
clock.host_time = lambda: real() + float((here / "offset").read_text())  # NTP may step it
from tests.step_runtime import make_runtime, settings_for
from worker.steps.tick import tick
engine = db.make_engine(url)
rt = make_runtime(engine, settings_for("https://queue.test", "k-" + name), batch_ids=frozenset({batch_id}))
tick(rt)  # the run is going
(here / f"ready-{name}").touch()
while not (here / "go").exists():
    time.sleep(0.02)
tick(rt)  # its first tick after the step
"""


def _wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_two_processes_move_a_wait_once_after_a_backward_step(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wanbatch.db'}"
    engine = db.make_engine(url)
    try:
        db.migrate(engine)
        one = add_batch(engine, "one", [("fal-ai/wan-22", {"prompt": "p"})])
        two = add_batch(engine, "two", [("fal-ai/wan-22", {"prompt": "q"})])
        (job,) = job_ids(engine, one)
        due = utcnow() + timedelta(seconds=30)
        with db.session_scope(engine) as session:
            waiting = {"state": JobState.RETRY_WAIT, "next_attempt_at": due}
            session.execute(update(Job).where(Job.id == job).values(**waiting))
        (tmp_path / "offset").write_text("0")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        kids = [
            subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), name, b, url], cwd=ROOT, env=env)
            for name, b in (("run-a", one), ("run-b", two))
        ]
        try:
            _wait_for(
                lambda: (
                    all((tmp_path / f"ready-{n}").exists() for n in ("run-a", "run-b"))
                    or any(k.poll() is not None for k in kids)
                ),
                "the runs never got going",
            )
            assert all(k.poll() is None for k in kids), "a run ended before the step"
            (tmp_path / "offset").write_text("-3600")  # NTP steps this host's clock back an hour
            (tmp_path / "go").touch()
            for kid in kids:
                assert kid.wait(DEADLINE) == 0
        finally:
            for kid in kids:
                if kid.poll() is None:
                    kid.kill()
                    kid.wait()
        with db.read_scope(engine) as session:
            state, at = session.execute(select(Job.state, Job.next_attempt_at).where(Job.id == job)).one()
        assert state == JobState.RETRY_WAIT
        assert at is not None
        # Brought forward once: by the step less the time between the last tick before it and
        # the first after (mark - now), so by at most an hour; twice would be nearly two hours.
        moved = (due - at).total_seconds()
        assert 1800 < moved <= 3600.001, f"the retry was brought forward by {moved:.0f} s"
        with db.read_scope(engine) as session:
            mark = session.execute(select(ClockMark.high_water)).scalar_one()
        assert mark < due - timedelta(seconds=1800)  # the mark followed the clock back
    finally:
        engine.dispose()


def test_the_catch_up_is_done_once_and_remembered_across_processes(tmp_path: Path) -> None:
    """The store's side, two engines on one file (as two processes): the first to look after the
    step moves the wait and lowers the mark, the second finds nothing; a clock that goes on
    forward raises the mark and moves nothing."""
    url = f"sqlite:///{tmp_path / 'wanbatch.db'}"
    engines = [db.make_engine(url), db.make_engine(url)]
    step = timedelta(seconds=2)
    try:
        db.migrate(engines[0])
        batch = add_batch(engines[0], "one", [("fal-ai/wan-22", {"prompt": "p"})])
        (job,) = job_ids(engines[0], batch)
        before = utcnow()
        due = before + timedelta(seconds=30)
        with db.session_scope(engines[0]) as session:
            session.execute(update(Job).where(Job.id == job).values(next_attempt_at=due))
            assert store.catch_up_with_timeline(session, now=before, step=step)[:2] == (timedelta(0), 0)
        with db.session_scope(engines[1]) as session:  # forward: the mark follows
            later = before + timedelta(seconds=5)
            assert store.catch_up_with_timeline(session, now=later, step=step)[:2] == (timedelta(0), 0)
        after = later - timedelta(hours=1)  # the step, seen by both
        with db.session_scope(engines[0]) as session:
            assert store.catch_up_with_timeline(session, now=after, step=step)[:2] == (timedelta(hours=1), 1)
        with db.session_scope(engines[1]) as session:
            found = store.catch_up_with_timeline(session, now=after + timedelta(seconds=1), step=step)
        assert found[:2] == (timedelta(0), 0)  # nothing left to do
        with db.read_scope(engines[1]) as session:
            at = session.execute(select(Job.next_attempt_at).where(Job.id == job)).scalar_one()
            mark = session.execute(select(ClockMark.high_water)).scalar_one()
        assert at == due - timedelta(hours=1)
        assert mark == after + timedelta(seconds=1)
    finally:
        for engine in engines:
            engine.dispose()
