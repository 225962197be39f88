"""A fal that accepts connections and never answers a cancel (a black hole: a stalled proxy, a
half-dead network after a laptop resumes) must not freeze the conductor either.

The status polls of a tick were bounded first (tests/integration/test_status_blackhole.py); the
tick's cancels — ``wanbatch cancel``'s, a window's end's — still went on the conductor's loop,
one after another, each waiting its connect and read timeouts: no heartbeat, no progress, no
dispatch, no deadline meanwhile. They now go in their order on a thread of their own, within a
short bound (:mod:`worker.steps.cancels`); one nothing answered is "not known yet": no failed
try, not ``cancelling``, sent again next tick.

Played by a loopback server that accepts submits and holds every cancel open; both dialects
(the ``engine`` fixture).
"""

from __future__ import annotations

import importlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from jobs import db, store
from jobs.models import BatchState, ConductorHeartbeat, utcnow
from jobs.schedule import Schedule
from jobs.states import JobState
from tests.hostile import HostileProvider, Recorded, json_reply, wait_for
from tests.hostile_fal import FakeFal
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker import conductor as conductor_module
from worker.conductor import Conductor
from worker.steps import Runtime, cancel_jobs_of_cancelled_batches, dispatch, submit
from worker.steps.schedule import enforce_schedules

KEY = "cancel-blackhole-key-3f9c"
JOBS = 3
CANCEL = r"/fal-ai/wan-22/requests/[^/]+/cancel"
STATUS = r"/fal-ai/wan-22/requests/[^/]+/status"
IN_QUEUE = {"status": "IN_QUEUE", "queue_position": 0}
#: The module (``worker.steps`` exports functions of the same names as some modules).
cancels_module = importlib.import_module("worker.steps.cancels")
#: Far above the bound (1 s + 1 s here), far below what one unbounded cancel waited (60 s).
BOUND = 15.0


@pytest.fixture
def released() -> Iterator[threading.Event]:
    """Set when the test lets the held cancels go (at its end in any case)."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cancels_module, "CANCEL_SECONDS", 1.0, raising=False)
    monkeypatch.setattr(cancels_module, "CANCEL_GRACE_SECONDS", 1.0, raising=False)


def _never_answers(released: threading.Event) -> Callable[[Recorded, socket.socket], None]:
    def behaviour(_req: Recorded, _sock: socket.socket) -> None:
        released.wait(120)  # the connection was accepted; no byte ever comes back

    return behaviour


def _within(seconds: float, step: Callable[[], int]) -> tuple[bool, list[int]]:
    """Run ``step`` on a thread; whether it returned within ``seconds``, and what it returned."""
    got: list[int] = []
    thread = threading.Thread(target=lambda: got.append(step()), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), got


def _at_fal(engine: Engine, hostile: HostileProvider, tmp_path: Path, name: str) -> tuple[str, Runtime]:
    FakeFal(hostile)
    hostile.route("GET", STATUS, json_reply(IN_QUEUE, 202))
    # The read timeout as a user has it (60 s): before, one tick waited it for every cancel.
    settings = settings_for(hostile.url, KEY, output_dir=tmp_path / "out", read_timeout=60.0)
    batch_id = add_batch(engine, name, [("fal-ai/wan-22", {"prompt": f"a heron {i}"}) for i in range(JOBS)])
    rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
    ids = job_ids(engine, batch_id)
    assert sorted(dispatch(rt)) == sorted(ids)
    assert [submit(rt, job_id) for job_id in ids] == ["submitted"] * JOBS
    return batch_id, rt


def _jobs(engine: Engine, batch_id: str) -> list[tuple[str, int]]:
    with db.read_scope(engine) as session:
        return sorted((job.state, job.attempts) for job in store.jobs_of_batch(session, batch_id))


def _cancel_batch(engine: Engine, batch_id: str) -> None:
    with db.session_scope(engine) as session:
        store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")


def _untried(rt: Runtime, engine: Engine, batch_id: str) -> bool:
    """No cancel of the batch counted as a failed try: each is due again at once."""
    with db.read_scope(engine) as session:
        jobs = list(store.jobs_of_batch(session, batch_id))
    return not rt.cancel_tries.given_up() and all(
        rt.cancel_tries.due(job.id, job.request_id or "") for job in jobs
    )


def test_a_cancel_fal_never_answers_is_bounded_not_known_yet_and_sent_again(
    engine: Engine, tmp_path: Path, bound: None, released: threading.Event
) -> None:
    with HostileProvider() as hostile:
        batch_id, rt = _at_fal(engine, hostile, tmp_path, "cancel-blackhole")
        try:
            hostile.route("PUT", CANCEL, _never_answers(released))
            _cancel_batch(engine, batch_id)

            returned, got = _within(BOUND, lambda: cancel_jobs_of_cancelled_batches(rt))
            assert returned, "the cancels of one tick waited on a fal that never answers"
            assert got == [0]
            # In their order, one at a time: the first (the newest) took the whole bound, and
            # the others were not sent after it — not sent at once, out of order.
            assert hostile.count("PUT", CANCEL) == 1
            # Not known yet: no failed try, not cancelling, and fal named unreachable.
            assert _jobs(engine, batch_id) == [(JobState.QUEUED, 1)] * JOBS
            assert _untried(rt, engine, batch_id)
            assert rt.fal_reach.down
            note = rt.fal_reach.note() or ""
            assert "cancel(s) unanswered" in note
            assert "no answer within 1s" in note

            # fal answers again: the next tick's cancels go through, in order, and are recorded.
            hostile.route("PUT", CANCEL, json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
            released.set()
            assert wait_for(lambda: not rt.cancel_lane.locked(), timeout=BOUND)
            assert cancel_jobs_of_cancelled_batches(rt) == JOBS
            assert _jobs(engine, batch_id) == [(JobState.CANCELLING, 1)] * JOBS
            assert not rt.fal_reach.down
        finally:
            released.set()
            rt.client.close()


def test_cancels_still_under_way_are_not_sent_again_by_the_next_tick(
    engine: Engine, tmp_path: Path, bound: None
) -> None:
    with HostileProvider() as hostile:
        batch_id, rt = _at_fal(engine, hostile, tmp_path, "cancel-lane")
        try:
            hostile.route("PUT", CANCEL, json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
            _cancel_batch(engine, batch_id)
            with rt.cancel_lane:  # an earlier tick's cancels, left behind, still under way
                assert cancel_jobs_of_cancelled_batches(rt) == 0
                assert enforce_schedules(rt) == 0
            assert hostile.count("PUT", CANCEL) == 0
            assert _jobs(engine, batch_id) == [(JobState.QUEUED, 1)] * JOBS
            assert cancel_jobs_of_cancelled_batches(rt) == JOBS  # its turn came
        finally:
            rt.client.close()


def _closed_window(now: datetime) -> Schedule:
    """A daily window that opens in two hours (UTC) and lasts one: closed now."""
    start = (now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    end = (now + timedelta(hours=3)).time().replace(second=0, microsecond=0)
    return Schedule(window=(start, end), timezone="UTC")


def test_a_window_end_whose_cancels_fal_never_answers_is_bounded(
    engine: Engine, tmp_path: Path, bound: None, released: threading.Event
) -> None:
    with HostileProvider() as hostile:
        batch_id, rt = _at_fal(engine, hostile, tmp_path, "window-blackhole")
        try:
            hostile.route("PUT", CANCEL, _never_answers(released))
            now = utcnow()
            with db.session_scope(engine) as session:
                store.set_batch_schedule(session, batch_id, schedule=_closed_window(now), priority="normal")

            returned, got = _within(BOUND, lambda: enforce_schedules(rt, now))
            assert returned, "a window's end waited on a fal that never answers its cancels"
            assert got == [0]
            assert hostile.count("PUT", CANCEL) == 1
            assert _jobs(engine, batch_id) == [(JobState.QUEUED, 1)] * JOBS

            hostile.route("PUT", CANCEL, json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
            released.set()
            assert wait_for(lambda: not rt.cancel_lane.locked(), timeout=BOUND)
            assert enforce_schedules(rt, now) == JOBS
            assert _jobs(engine, batch_id) == [(JobState.CANCELLING, 1)] * JOBS
        finally:
            released.set()
            rt.client.close()


def _seen_at(engine: Engine) -> list[datetime]:
    with db.read_scope(engine) as session:
        return list(session.scalars(select(ConductorHeartbeat.seen_at)))


def test_a_cancel_never_answered_leaves_the_conductor_beating(
    engine: Engine,
    tmp_path: Path,
    bound: None,
    monkeypatch: pytest.MonkeyPatch,
    released: threading.Event,
) -> None:
    monkeypatch.setattr(conductor_module, "HEARTBEAT_SECONDS", 0.2)
    with HostileProvider() as hostile:
        batch_id, rt = _at_fal(engine, hostile, tmp_path, "cancel-beats")
        hostile.route("PUT", CANCEL, _never_answers(released))
        _cancel_batch(engine, batch_id)

        conductor = Conductor(rt, stream=False)
        stopping = threading.Event()
        progress: list[float] = []

        def on_progress() -> bool:
            progress.append(time.monotonic())
            return False

        runner = threading.Thread(
            target=conductor.run,
            args=(stopping,),
            kwargs={"on_progress": on_progress, "progress_every": 0.1},
            daemon=True,
        )
        runner.start()
        try:
            assert wait_for(lambda: hostile.count("PUT", CANCEL) >= 1, timeout=30)
            beats = _seen_at(engine)
            calls = len(progress)
            # The cancel is held open, yet the loop goes on: progress lines and heartbeats.
            assert wait_for(
                lambda: len(progress) >= calls + 3 and sorted(_seen_at(engine)) > sorted(beats),
                timeout=BOUND,
            ), (len(progress) - calls, hostile.count("PUT", CANCEL))
            assert _jobs(engine, batch_id) == [(JobState.QUEUED, 1)] * JOBS
            assert _untried(rt, engine, batch_id)

            # fal answers again: the cancels go through.
            hostile.route("PUT", CANCEL, json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
            released.set()
            assert wait_for(
                lambda: {state for state, _ in _jobs(engine, batch_id)} == {JobState.CANCELLING},
                timeout=30,
            )
        finally:
            stopping.set()
            released.set()
            runner.join(timeout=30)
            conductor.close()
            rt.client.close()
        assert not runner.is_alive()


def test_a_cancel_thread_that_cannot_start_does_not_hold_the_lane(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lane was taken before the thread started, and only the thread gave it back: a start
    that failed (``RuntimeError: can't start new thread``, the thread limit reached) held it for
    ever, and every later tick's cancels were skipped as "still under way", in silence."""
    with HostileProvider() as hostile:
        batch_id, rt = _at_fal(engine, hostile, tmp_path, "cancel-nothread")
        try:
            hostile.route("PUT", CANCEL, json_reply({"status": "CANCELLATION_REQUESTED"}, 202))
            _cancel_batch(engine, batch_id)
            real_start = threading.Thread.start

            def no_thread(self: threading.Thread) -> None:
                raise RuntimeError("can't start new thread")

            monkeypatch.setattr(threading.Thread, "start", no_thread)
            with pytest.raises(RuntimeError, match="can't start new thread"):
                cancel_jobs_of_cancelled_batches(rt)
            monkeypatch.setattr(threading.Thread, "start", real_start)
            assert not rt.cancel_lane.locked()
            assert hostile.count("PUT", CANCEL) == 0
            assert cancel_jobs_of_cancelled_batches(rt) == JOBS  # the next tick sends them
            assert _jobs(engine, batch_id) == [(JobState.CANCELLING, 1)] * JOBS
        finally:
            rt.client.close()
