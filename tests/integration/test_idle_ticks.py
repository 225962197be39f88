"""A conductor with nothing to look after ticks less often.

The tick is the safety net behind the streams and events: a batch waiting for its window (an
overnight render started in the evening) used to pay a full tick, about 45 ms of CPU, every
second — 5 % of a core for hours. After ``QUIET_TICKS`` ticks that found nothing at fal, nothing
to download and nothing to do, the interval doubles up to ``IDLE_TICK_FACTOR`` times the tick;
any event brings it back.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.models import utcnow
from jobs.schedule import Schedule
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.conductor import IDLE_TICK_FACTOR, QUIET_TICKS, Conductor, idle_interval
from worker.steps import dispatch, submit

KEY = "idle-ticks-key-3e81"
T2V = "fal-ai/wan-22"


def test_the_interval_doubles_after_the_quiet_ticks_up_to_its_bound() -> None:
    assert [idle_interval(1.0, q) for q in range(QUIET_TICKS)] == [1.0] * QUIET_TICKS
    grown = [idle_interval(1.0, q) for q in range(QUIET_TICKS, QUIET_TICKS + 6)]
    assert grown == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    assert IDLE_TICK_FACTOR == 8
    assert idle_interval(0.05, 100) == pytest.approx(0.4)


def _waiting_for_its_window(engine: Engine) -> str:
    batch_id = add_batch(engine, "overnight", [(T2V, {"prompt": "a harbour at night"})])
    with db.session_scope(engine) as session:
        store.set_batch_schedule(
            session, batch_id, schedule=Schedule(not_before=utcnow() + timedelta(hours=1)), priority="normal"
        )
    return batch_id


def test_a_tick_is_quiet_only_when_nothing_is_at_fal(engine: Engine, hostile: HostileProvider) -> None:
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    _waiting_for_its_window(engine)
    conductor = Conductor(rt, stream=False)
    stopping = threading.Event()
    assert conductor._tick(stopping) is True  # the window is closed: nothing to do

    add_batch(engine, "now", [(T2V, {"prompt": "a lighthouse"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    assert conductor._tick(stopping) is False  # a request at fal: the safety net stays on


def test_a_batch_waiting_for_its_window_is_ticked_less_often(
    engine: Engine, hostile: HostileProvider
) -> None:
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, tick_interval=0.05))
    _waiting_for_its_window(engine)
    conductor = Conductor(rt, stream=False)
    stopping = threading.Event()
    runner = threading.Thread(target=conductor.run, args=(stopping,))
    runner.start()
    stopping.wait(3.0)
    stopping.set()
    runner.join(timeout=10)
    # Every 0.05 s that is 60 ticks; backing off (5 at 0.05 s, then 0.1, 0.2 and 0.4 s) about 13.
    assert QUIET_TICKS <= conductor.stats.ticks <= 20
