"""What a tick costs while an embedded run's jobs wait at fal.

A Wan render takes 60 to 150 s, and all that time the conductor ticks every second as the
safety net behind the streams: its statements were two thirds of a run's CPU while 8 jobs
waited (about 11 ms a second, seven times a job's whole cost on the drain bench). Per tick the
simulations' batches were read four times, and dispatch, with nothing left to claim, still took
the shared submit-rate bucket's tokens and gave them back (a write every tick), read the
batches and ran the claim; the schedules' look took the write lock for a read.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event

from jobs import db, store
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.conductor import Conductor
from worker.steps import dispatch, submit

KEY = "tick-statements-key-5d27"
T2V = "fal-ai/wan-22"
RUNNING = {"status": "IN_PROGRESS", "logs": None}


@pytest.fixture
def write_units(engine: Engine) -> Iterator[list[int]]:
    """How many units of work began on SQLite's writer connection (each a ``BEGIN IMMEDIATE``:
    the single write lock, taken from every other process too); PostgreSQL: not counted."""
    begun = [0]
    writer = db.writer_engine(engine)

    def began(_conn: Any) -> None:
        begun[0] += 1

    if writer is not engine:
        event.listen(writer, "begin", began)
    yield begun
    if writer is not engine:
        event.remove(writer, "begin", began)


def test_a_tick_while_the_jobs_wait_at_fal_costs_fewer_statements(
    engine: Engine, hostile: HostileProvider, statements: list[str], write_units: list[int]
) -> None:
    fal = FakeFal(hostile)
    # Polls far apart: the steady state between two status calls, as with a stream per request.
    settings = settings_for(hostile.url, KEY, poll_min_interval=3600.0, poll_max_interval=3600.0)
    batch_id = add_batch(engine, "renders", [(T2V, {"prompt": f"a harbour, take {n}"}) for n in range(3)])
    rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))  # as an embedded run
    for job_id in dispatch(rt):
        assert submit(rt, job_id) == "submitted"
    with db.read_scope(engine) as session:
        at_fal = list(store.jobs_of_batch(session, batch_id, states=[JobState.QUEUED]))
    assert len(at_fal) == 3
    for job in at_fal:
        assert job.request_id is not None
        fal.on_status(job.request_id, json_reply(RUNNING))
    conductor = Conductor(rt, stream=False)
    stopping = threading.Event()
    conductor._tick(stopping)  # the first: its heartbeat, the clock's mark
    statements.clear()
    write_units[0] = 0
    ticks = 5
    for _ in range(ticks):
        assert conductor._tick(stopping) is False  # requests at fal: never a quiet tick
    per_tick = len(statements) / ticks
    # Before: 21 a tick (the simulations' batches 3 times, and dispatch's 6 for nothing to claim).
    assert per_tick <= 14, statements[: int(per_tick) + 1]
    assert sum("simulated" in s for s in statements) == ticks  # once a tick
    assert not any("submit_rate" in s for s in statements)  # no tokens taken and given back
    # The clock's mark (SQLite) is looked at and raised only once the clock passed it by
    # jobs.clock.MARK_SLACK_SECONDS: at most once in these ticks. Before: read and written each.
    assert sum("clock_marks" in s for s in statements) <= 2
    if db.writer_engine(engine) is not engine:
        # Before: 6 a tick (the clock's mark, reconcile, schedules, poll, dispatch, downloads).
        assert write_units[0] <= 4 * ticks + 1
