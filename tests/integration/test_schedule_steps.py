"""Schedules and pauses, step by step against the simulator (issue #12).

An account running 2 requests at once for 5 s each: after 6 submits, 2 run and 4 wait in fal's
queue. Closing the batch's window (or passing its deadline) then shows what each step does with
each kind of job, with the time given explicitly where it matters (:func:`enforce_schedules`
takes ``now``; :class:`jobs.schedule.Schedule` is tested on its own in tests/unit).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import db, store
from jobs.schedule import Schedule
from jobs.states import JobState
from tests.step_runtime import add_batch, job_states, make_runtime, settings_for, wait_until
from worker.steps import Runtime, dispatch, poll, submit
from worker.steps.schedule import enforce_schedules

S = JobState
KEY = "schedule-steps-key-5c2e"


@pytest.fixture
def slow_sim() -> Iterator[SimulatorHandle]:
    options = SimulatorOptions(
        concurrency_limit=2, latency_seconds=5.0, latency_jitter=0.0, cancel_stops_running=True, rng_seed=3
    )
    with running_simulator(options) as sim:
        yield sim


def _set_schedule(engine: Engine, batch_id: str, schedule: Schedule) -> None:
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, batch_id, schedule=schedule, priority="normal")


def _closed_window(now: datetime) -> Schedule:
    """A daily window that opens in two hours (UTC) and lasts one: closed now."""
    start = (now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    end = (now + timedelta(hours=3)).time().replace(second=0, microsecond=0)
    return Schedule(window=(start, end), timezone="UTC")


def _six_at_fal(engine: Engine, sim: SimulatorHandle, name: str) -> tuple[str, Runtime]:
    rt = make_runtime(engine, settings_for(sim.url, KEY, max_outstanding=6))
    batch_id = add_batch(engine, name, [("fal-ai/wan-22", {"prompt": f"night {i}"}) for i in range(8)])
    for job_id in dispatch(rt):
        assert submit(rt, job_id) == "submitted"
    wait_until(lambda: job_states(engine, batch_id).get("running") == 2, step=lambda: poll(rt))
    return batch_id, rt


def test_a_window_end_sends_queued_requests_back_to_pending_unbilled(
    engine: Engine, slow_sim: SimulatorHandle
) -> None:
    batch_id, rt = _six_at_fal(engine, slow_sim, "window-end")
    assert job_states(engine, batch_id) == {"running": 2, "queued": 4, "pending": 2}
    now = datetime.now(UTC)
    _set_schedule(engine, batch_id, _closed_window(now))

    assert dispatch(rt) == []  # closed: nothing more is claimed
    enforce_schedules(rt, now)
    wait_until(lambda: job_states(engine, batch_id).get("cancelling", 0) == 0, step=lambda: poll(rt))

    assert job_states(engine, batch_id) == {"running": 2, "pending": 6}
    with db.session_scope(engine) as session:
        back = [j for j in store.jobs_of_batch(session, batch_id) if j.state == S.PENDING]
        assert all(j.attempts == 0 and j.request_id is None and j.submitted_input is None for j in back)
    ledger = slow_sim.ledger()
    never_started = [e for e in ledger["entries"] if e["started_at"] is None]
    assert len(never_started) == 4
    assert not any(e["billed"] for e in never_started)


def test_a_deadline_cancels_the_unsent_and_the_queued_and_lets_running_finish(
    engine: Engine, slow_sim: SimulatorHandle
) -> None:
    batch_id, rt = _six_at_fal(engine, slow_sim, "deadline")
    now = datetime.now(UTC)
    _set_schedule(engine, batch_id, Schedule(deadline=now + timedelta(seconds=1)))
    later = now + timedelta(seconds=2)
    enforce_schedules(rt, later)
    wait_until(lambda: job_states(engine, batch_id).get("cancelling", 0) == 0, step=lambda: poll(rt))

    assert job_states(engine, batch_id) == {"running": 2, "cancelled": 6}
    with db.session_scope(engine) as session:
        cancelled = [j for j in store.jobs_of_batch(session, batch_id) if j.state == S.CANCELLED]
        assert all(j.error_type == "deadline" for j in cancelled), [j.error_type for j in cancelled]
        assert all((j.actual_usd or 0) == 0 for j in cancelled)


def test_a_paused_batch_sends_nothing_until_resumed(engine: Engine, slow_sim: SimulatorHandle) -> None:
    rt = make_runtime(engine, settings_for(slow_sim.url, KEY, max_outstanding=6))
    batch_id = add_batch(engine, "paused", [("fal-ai/wan-22", {"prompt": f"p {i}"}) for i in range(3)])
    with db.session_scope(engine) as session:
        store.set_paused_by_user(session, batch_id, True)
    assert dispatch(rt) == []
    with db.session_scope(engine) as session:
        store.set_paused_by_user(session, batch_id, False)
    assert len(dispatch(rt)) == 3


def test_a_window_that_is_open_lets_dispatch_claim(engine: Engine, slow_sim: SimulatorHandle) -> None:
    rt = make_runtime(engine, settings_for(slow_sim.url, KEY, max_outstanding=6))
    batch_id = add_batch(engine, "open", [("fal-ai/wan-22", {"prompt": f"o {i}"}) for i in range(2)])
    now = datetime.now(UTC)
    around_now = ((now - timedelta(hours=1)).time(), (now + timedelta(hours=1)).time())  # may cross midnight
    _set_schedule(engine, batch_id, Schedule(window=around_now, timezone="UTC"))
    assert len(dispatch(rt)) == 2


def test_status_calls_out_low_priority_requests_waiting_long(
    engine: Engine, slow_sim: SimulatorHandle
) -> None:
    """fal serves low priority only when no normal request waits: `status` says when that bites."""
    from jobs.batches import LOW_PRIORITY_WAIT_SECONDS, batch_report

    batch_id, _rt = _six_at_fal(engine, slow_sim, "starving")
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, batch_id, schedule=None, priority="low")
    soon = datetime.now(UTC) + timedelta(seconds=1)
    later = datetime.now(UTC) + timedelta(seconds=LOW_PRIORITY_WAIT_SECONDS + 1)
    with db.session_scope(engine) as session:
        assert batch_report(session, batch_id, now=soon)["low_priority_waiting"] == 0
        report = batch_report(session, batch_id, now=later)
    assert report["low_priority_waiting"] == 4  # the four still IN_QUEUE at fal
    assert "low-priority" in report["low_priority_note"]


def test_nothing_is_claimed_before_not_before_nor_after_the_deadline(
    engine: Engine, slow_sim: SimulatorHandle
) -> None:
    rt = make_runtime(engine, settings_for(slow_sim.url, KEY, max_outstanding=6))
    batch_id = add_batch(engine, "later", [("fal-ai/wan-22", {"prompt": f"l {i}"}) for i in range(2)])
    now = datetime.now(UTC)
    _set_schedule(engine, batch_id, Schedule(not_before=now + timedelta(hours=1)))
    assert dispatch(rt) == []
    _set_schedule(engine, batch_id, Schedule(deadline=now - timedelta(seconds=1)))
    assert dispatch(rt) == []
    _set_schedule(engine, batch_id, Schedule(not_before=now - timedelta(seconds=1)))
    assert len(dispatch(rt)) == 2


def _slow_token(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The global submit rate makes every submit wait ``seconds`` for its token."""
    # The module, not the function the package re-exports under the same name.
    submit_step = importlib.import_module("worker.steps.submit")
    real: Callable[[Runtime, str], tuple[str, float] | None] = submit_step._take_submit_token

    def slow(rt: Runtime, endpoint: str) -> tuple[str, float] | None:
        time.sleep(seconds)
        return real(rt, endpoint)

    monkeypatch.setattr(submit_step, "_take_submit_token", slow)


def test_the_start_timeout_is_counted_from_the_post_not_from_the_claim(
    engine: Engine, slow_sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = make_runtime(engine, settings_for(slow_sim.url, KEY, max_outstanding=6))
    batch_id = add_batch(engine, "start-by", [("fal-ai/wan-22", {"prompt": "late"})])
    deadline = datetime.now(UTC) + timedelta(seconds=4)
    _set_schedule(engine, batch_id, Schedule(deadline=deadline))
    _slow_token(monkeypatch, 1.0)  # a second passes between the claim and the POST

    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    (entry,) = slow_sim.ledger()["entries"]
    # fal may start the request only until the deadline, counted from when it received it.
    assert entry["start_timeout"] is not None
    assert entry["accepted_at"] + entry["start_timeout"] <= deadline.timestamp() + 0.2


def test_a_submit_that_waited_past_its_deadline_is_held_back_unsent(
    engine: Engine, slow_sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = make_runtime(engine, settings_for(slow_sim.url, KEY, max_outstanding=6))
    batch_id = add_batch(engine, "too-late", [("fal-ai/wan-22", {"prompt": "too late"})])
    _set_schedule(engine, batch_id, Schedule(deadline=datetime.now(UTC) + timedelta(seconds=2.5)))
    _slow_token(monkeypatch, 2.0)  # under a second of the deadline is left when the POST would go

    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "outside-schedule"
    assert slow_sim.ledger()["entries"] == []
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert job.state == S.PENDING
        assert job.attempts == 0
        assert job.submitted_input is None
        assert job.lease_owner is None
