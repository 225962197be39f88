"""Schedules and pauses, step by step against the simulator (issue #12).

An account running 2 requests at once for 5 s each: after 6 submits, 2 run and 4 wait in fal's
queue. Closing the batch's window (or passing its deadline) then shows what each step does with
each kind of job, with the time given explicitly where it matters (:func:`enforce_schedules`
takes ``now``; :class:`jobs.schedule.Schedule` is tested on its own in tests/unit).
"""

from __future__ import annotations

import importlib
import io
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cli import output
from falsim.ledger import EntryRecord
from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import batches, db, export, store
from jobs.batches import FailureReason
from jobs.billing import Outcome
from jobs.errors import RetryableProviderError
from jobs.models import Job, utcnow
from jobs.schedule import Schedule
from jobs.states import JobState
from tests.step_runtime import add_batch, job_states, make_runtime, settings_for, wait_until
from worker.fal.models import Status
from worker.steps import Runtime, dispatch, poll, submit
from worker.steps.failures import settle
from worker.steps.schedule import START_TIMED_OUT, WINDOW_CLOSED, end_unstarted, enforce_schedules

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
        # The four that waited in fal's queue were sent: they keep their request, counted in
        # ``attempts`` but not against WANBATCH_MAX_ATTEMPTS; the two never sent have none.
        sent = [j for j in back if j.submitted_at is not None]
        assert len(sent) == 4
        for job in sent:
            assert (job.attempts, job.unstarted_requests, job.counted_attempts) == (1, 1, 0)
            assert job.request_id is not None
            assert job.submitted_input is not None
            assert (job.error or "").startswith("window closed: cancelled at fal")
        unsent = [j for j in back if j.submitted_at is None]
        assert all(j.attempts == 0 and j.request_id is None and j.submitted_input is None for j in unsent)
    ledger = slow_sim.ledger()
    never_started = [e for e in ledger["entries"] if e["started_at"] is None]
    assert len(never_started) == 4
    assert {e["request_id"] for e in never_started} == {j.request_id for j in sent}
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


def test_no_window_before_the_deadline_ends_the_unsent_now_as_the_deadline_would(
    engine: Engine, slow_sim: SimulatorHandle
) -> None:
    """The window has closed and the next opens only after the deadline: the unsent jobs end now
    (reason ``deadline``), not at the deadline; the queued requests are cancelled at fal and end
    the same way; the running ones finish."""
    batch_id, rt = _six_at_fal(engine, slow_sim, "never-again")
    now = datetime.now(UTC)
    closed = _closed_window(now)  # opens in two hours
    deadline = (now + timedelta(hours=1)).replace(second=0, microsecond=0)
    _set_schedule(engine, batch_id, Schedule(deadline=deadline, window=closed.window, timezone="UTC"))

    enforce_schedules(rt, now)
    wait_until(lambda: job_states(engine, batch_id).get("cancelling", 0) == 0, step=lambda: poll(rt))
    enforce_schedules(rt, now)  # the queued ones came back unsent: the next tick ends them too

    assert job_states(engine, batch_id) == {"running": 2, "cancelled": 6}
    with db.session_scope(engine) as session:
        cancelled = [j for j in store.jobs_of_batch(session, batch_id) if j.state == S.CANCELLED]
        assert {j.error_type for j in cancelled} == {"deadline"}
        assert all((j.actual_usd or 0) == 0 for j in cancelled)
        never_sent = [j for j in cancelled if j.submitted_at is None]
        assert len(never_sent) == 2
        window = closed.as_json()["window"]
        assert {j.error for j in never_sent} == {
            f"not sent before the batch's deadline ({deadline:%Y-%m-%d %H:%M} +00:00): "
            f"the last window ({window} UTC) closed and none opens before it"
        }


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


def _slow_token(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[datetime]:
    """The global submit rate makes every submit wait ``seconds`` for its token. Returns the
    times (this machine's clock, as the submit step reads it) each token was had."""
    # The module, not the function the package re-exports under the same name.
    submit_step = importlib.import_module("worker.steps.submit")
    real: Callable[[Runtime, str], tuple[str, float] | None] = submit_step._take_submit_token
    had: list[datetime] = []

    def slow(rt: Runtime, endpoint: str) -> tuple[str, float] | None:
        time.sleep(seconds)
        answer = real(rt, endpoint)
        had.append(utcnow())
        return answer

    monkeypatch.setattr(submit_step, "_take_submit_token", slow)
    return had


def test_the_start_timeout_is_counted_from_the_post_not_from_the_claim(
    engine: Engine, slow_sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = make_runtime(engine, settings_for(slow_sim.url, KEY, max_outstanding=6))
    batch_id = add_batch(engine, "start-by", [("fal-ai/wan-22", {"prompt": "late"})])
    # Far enough that no load can bring it before the POST: the submit is sent.
    deadline = datetime.now(UTC) + timedelta(minutes=10)
    _set_schedule(engine, batch_id, Schedule(deadline=deadline))
    had = _slow_token(monkeypatch, 1.0)  # a second passes between the claim and the POST

    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    (entry,) = slow_sim.ledger()["entries"]
    # fal may start the request only until the deadline, counted from when it received it: the
    # time left when the POST went, after the token, not when the job was claimed (a second
    # more). Judged against the clock read after the token, not against fal's receipt, which a
    # loaded machine may delay by any time.
    assert entry["start_timeout"] is not None
    # The last token had: a grant gone stale while the lease was recorded is taken again.
    assert entry["start_timeout"] <= (deadline - had[-1]).total_seconds()


def test_a_submit_that_waited_past_its_deadline_is_held_back_unsent(
    engine: Engine, slow_sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = make_runtime(engine, settings_for(slow_sim.url, KEY, max_outstanding=6))
    batch_id = add_batch(engine, "too-late", [("fal-ai/wan-22", {"prompt": "too late"})])
    # Far enough that no load brings it before the claim and the check that precedes the token.
    deadline = datetime.now(UTC) + timedelta(minutes=10)
    _set_schedule(engine, batch_id, Schedule(deadline=deadline))
    # The submit step's clock, once it has its token: under a second of the deadline is left
    # when the POST would go (driven, not slept towards: no load can change what it reads).
    submit_step = importlib.import_module("worker.steps.submit")
    had = _slow_token(monkeypatch, 0.0)
    real_utcnow = submit_step.utcnow
    monkeypatch.setattr(
        submit_step, "utcnow", lambda: deadline - timedelta(seconds=0.5) if had else real_utcnow()
    )

    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "outside-schedule"
    assert had  # held back after the token was had, by the check right before the POST
    assert slow_sim.ledger()["entries"] == []
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert job.state == S.PENDING
        assert job.attempts == 0
        assert job.submitted_input is None
        assert job.lease_owner is None


# -- fal's own start timeout: the window's end as fal sees it -----------------------------------
#
# Every submit of a scheduled batch carries the time left as fal's start timeout, so fal itself
# times out the requests still in its queue when the window ends — usually before our own
# window-close cancel (``enforce_schedules``) asks. Here the submits get a start timeout of two
# seconds (a deadline that close); the schedule the worker then finds decides what the timeout
# means: a closed window, the deadline, or (a clock behind fal's) a window still open.

#: The start timeout the submits below carry (a deadline this far away when they are sent).
START_TIMEOUT = timedelta(seconds=4)  # room for a loaded CI machine to send all four before it ends


@pytest.fixture
def busy_sim() -> Iterator[SimulatorHandle]:
    """Two slots, each busy for a minute: of four requests, two run and two wait in the queue
    until their start timeout ends them (fal's ``request_timeout``, never started, not billed)."""
    options = SimulatorOptions(
        concurrency_limit=2, latency_seconds=60.0, latency_jitter=0.0, cancel_stops_running=True, rng_seed=5
    )
    with running_simulator(options) as sim:
        yield sim


#: The error of a job whose request fal timed out in its queue at the deadline (the start timeout
#: its submit carried): it said "cancelled in fal's queue", though wanbatch cancelled nothing.
TIMED_OUT_AT_DEADLINE = (
    "fal timed it out in its queue at the batch's deadline, before it started (not billed)"
)


def _two_waiting_at_fal(engine: Engine, sim: SimulatorHandle, name: str) -> tuple[str, Runtime]:
    """Six jobs, at most four at fal, one attempt each (the tester's WANBATCH_MAX_ATTEMPTS=1):
    two run, two wait in fal's queue with a start timeout of :data:`START_TIMEOUT`."""
    rt = make_runtime(engine, settings_for(sim.url, KEY, max_outstanding=4, max_attempts=1))
    batch_id = add_batch(engine, name, [("fal-ai/wan-22", {"prompt": f"late {i}"}) for i in range(6)])
    _set_schedule(engine, batch_id, Schedule(deadline=datetime.now(UTC) + START_TIMEOUT))
    for job_id in dispatch(rt):
        assert submit(rt, job_id) == "submitted"
    wait_until(lambda: job_states(engine, batch_id).get("running") == 2, step=lambda: poll(rt))
    assert job_states(engine, batch_id) == {"running": 2, "queued": 2, "pending": 2}
    return batch_id, rt


def _timed_out_at_fal(sim: SimulatorHandle, count: int) -> Callable[[], bool]:
    """Whether fal has ended ``count`` requests by their start timeout (they never started)."""

    def done() -> bool:
        entries = sim.ledger()["entries"]
        return sum(1 for e in entries if e["outcome"] == "timeout") == count

    return done


def _requests_fal_timed_out(sim: SimulatorHandle) -> list[EntryRecord]:
    timed_out = [e for e in sim.ledger()["entries"] if e["outcome"] == "timeout"]
    assert len(timed_out) == 2
    assert all(e["started_at"] is None and not e["billed"] for e in timed_out), timed_out
    return timed_out


def _jobs(engine: Engine, batch_id: str, state: JobState) -> list[Job]:
    with db.session_scope(engine) as session:
        jobs = [j for j in store.jobs_of_batch(session, batch_id) if j.state == state]
        session.expunge_all()
        return jobs


def test_a_request_fal_timed_out_at_the_window_end_goes_back_to_pending_uncounted(
    engine: Engine, busy_sim: SimulatorHandle
) -> None:
    batch_id, rt = _two_waiting_at_fal(engine, busy_sim, "timed-out-window")
    _set_schedule(engine, batch_id, _closed_window(datetime.now(UTC)))  # the window has ended

    # No window-close cancel: fal's start timeout ends the two waiting requests first.
    wait_until(lambda: job_states(engine, batch_id).get("queued", 0) == 0, step=lambda: poll(rt))

    assert job_states(engine, batch_id) == {"running": 2, "pending": 4}
    back = _jobs(engine, batch_id, S.PENDING)
    timed_out = {str(e["request_id"]) for e in _requests_fal_timed_out(busy_sim)}
    with db.session_scope(engine) as session:
        for job in back:
            assert job.counted_attempts == 0, "fal never started it: no attempt is counted"
            assert (job.actual_usd or 0) == 0
            if job.submitted_at is not None:  # one of the two that fal timed out: it was sent
                assert (job.attempts, job.unstarted_requests) == (1, 1)
                assert job.request_id in timed_out
                assert job.submitted_input is not None
                assert job.error_type == "window_closed"
                assert job.error == (
                    "window closed: fal timed it out in its queue before it started (request_timeout)"
                )
                (last,) = store.job_events(session, job.id)[-1:]
                assert (last.from_state, last.to_state) == (S.QUEUED, S.PENDING)
                assert "window closed" in str(last.reason)
                assert "request_timeout" in str(last.reason)
            else:
                assert (job.attempts, job.request_id, job.submitted_input) == (0, None, None)
    assert len(timed_out) == 2
    assert sum(j.submitted_at is not None for j in back) == 2
    assert dispatch(rt) == []  # the next window sends them again, not this one


def test_a_request_fal_timed_out_at_the_deadline_is_cancelled_for_the_deadline(
    engine: Engine, busy_sim: SimulatorHandle
) -> None:
    batch_id, rt = _two_waiting_at_fal(engine, busy_sim, "timed-out-deadline")

    # The deadline passes; fal's start timeout ends the waiting requests before any cancel.
    wait_until(lambda: job_states(engine, batch_id).get("queued", 0) == 0, step=lambda: poll(rt))

    assert job_states(engine, batch_id) == {"running": 2, "cancelled": 2, "pending": 2}
    _requests_fal_timed_out(busy_sim)
    for job in _jobs(engine, batch_id, S.CANCELLED):
        assert job.error_type == "deadline"
        # fal timed it out (the start timeout its submit carried): wanbatch cancelled nothing.
        assert job.error == TIMED_OUT_AT_DEADLINE
        assert job.attempts == 1
        assert (job.actual_usd or 0) == 0
    enforce_schedules(rt)  # the deadline path ends the jobs never sent as usual
    assert job_states(engine, batch_id) == {"running": 2, "cancelled": 4}


def test_a_request_fal_timed_out_while_the_window_is_still_open_here_costs_no_attempt(
    engine: Engine, busy_sim: SimulatorHandle
) -> None:
    """Our clock behind fal's: the start timeout ended the request, yet the schedule is open here."""
    batch_id, rt = _two_waiting_at_fal(engine, busy_sim, "timed-out-open")
    now = datetime.now(UTC)
    around_now = ((now - timedelta(hours=1)).time(), (now + timedelta(hours=1)).time())
    _set_schedule(engine, batch_id, Schedule(window=around_now, timezone="UTC"))

    wait_until(lambda: job_states(engine, batch_id).get("queued", 0) == 0, step=lambda: poll(rt))

    assert job_states(engine, batch_id) == {"running": 2, "pending": 4}
    _requests_fal_timed_out(busy_sim)
    assert all(j.counted_attempts == 0 for j in _jobs(engine, batch_id, S.PENDING))
    # Due at once: the open window sends them again (within the two free places at fal).
    assert len(dispatch(rt)) == 2


def test_a_request_fal_timed_out_after_its_schedule_was_removed_costs_no_attempt(
    engine: Engine, busy_sim: SimulatorHandle
) -> None:
    """The manifest submitted again without ``schedule`` while requests sent with a start timeout
    wait at fal: fal still ends them at the old deadline, unstarted and unbilled. What they were
    sent with decides, not the batch's schedule now: no attempt is counted (the tester allows one),
    and with no schedule left they are due again at once."""
    batch_id, rt = _two_waiting_at_fal(engine, busy_sim, "timed-out-unscheduled")
    with db.session_scope(engine) as session:
        queued = [j for j in store.jobs_of_batch(session, batch_id) if j.state == S.QUEUED]
        assert all(j.start_timeout_at is not None for j in queued), "recorded with the POST"
    _set_schedule(engine, batch_id, Schedule())  # the schedule removed

    wait_until(lambda: job_states(engine, batch_id).get("queued", 0) == 0, step=lambda: poll(rt))

    assert job_states(engine, batch_id) == {"running": 2, "pending": 4}
    timed_out = {str(e["request_id"]) for e in _requests_fal_timed_out(busy_sim)}
    back = [j for j in _jobs(engine, batch_id, S.PENDING) if j.request_id in timed_out]
    assert len(back) == 2
    for job in back:
        assert (job.attempts, job.unstarted_requests, job.counted_attempts) == (1, 1, 0)
        assert (job.actual_usd or 0) == 0
        assert job.error_type is None
    # Due at once: nothing holds them back now (within the two free places at fal).
    assert len(dispatch(rt)) == 2


def test_a_window_close_cancel_that_finds_the_request_timed_out_sends_it_back_uncounted(
    engine: Engine, busy_sim: SimulatorHandle
) -> None:
    """The other order: fal timed the requests out, then the window-close cancel asked for them
    (fal answers "already completed") before any status was read."""
    batch_id, rt = _two_waiting_at_fal(engine, busy_sim, "timed-out-then-cancelled")
    _set_schedule(engine, batch_id, _closed_window(datetime.now(UTC)))
    wait_until(_timed_out_at_fal(busy_sim, 2), step=lambda: None)

    enforce_schedules(rt)
    assert job_states(engine, batch_id) == {"running": 2, "cancelling": 2, "pending": 2}
    wait_until(lambda: job_states(engine, batch_id).get("cancelling", 0) == 0, step=lambda: poll(rt))

    assert job_states(engine, batch_id) == {"running": 2, "pending": 4}
    assert all(j.counted_attempts == 0 for j in _jobs(engine, batch_id, S.PENDING))


def test_a_request_timed_out_at_the_window_end_then_cut_off_by_the_deadline_exports_as_sent(
    engine: Engine, busy_sim: SimulatorHandle, tmp_path: Path
) -> None:
    """Sent in its window, timed out in fal's queue when the window closed, then cancelled at
    the deadline before a later window sent it again: its export row says it was sent — when,
    as which request, in how many attempts — and what happened, as its history does; a job
    never sent says none of it."""
    batch_id, rt = _two_waiting_at_fal(engine, busy_sim, "timed-out-then-deadline")
    _set_schedule(engine, batch_id, _closed_window(datetime.now(UTC)))
    wait_until(lambda: job_states(engine, batch_id).get("queued", 0) == 0, step=lambda: poll(rt))
    timed_out = {str(e["request_id"]) for e in _requests_fal_timed_out(busy_sim)}

    now = datetime.now(UTC)
    berlin = Schedule(deadline=now, timezone="Europe/Berlin")
    _set_schedule(engine, batch_id, berlin)
    enforce_schedules(rt, now + timedelta(seconds=1))
    assert job_states(engine, batch_id) == {"running": 2, "cancelled": 4}

    # As the batch's ``schedule:`` line says it: in its zone, to the second, with the offset.
    deadline = f"the batch's deadline ({berlin.stamp(now)})"
    local = now.astimezone(berlin.tz)
    assert f"{local:%Y-%m-%d %H:%M}" in deadline, deadline
    assert deadline.endswith(" +01:00)"), deadline
    with db.session_scope(engine) as session:
        batch = store.get_batch(session, batch_id)
        rows = {
            job.id: export.record(job, batch, tmp_path)
            for job in store.jobs_of_batch(session, batch_id)
            if job.state == S.CANCELLED
        }
        histories = {job_id: store.job_events(session, job_id) for job_id in rows}
    sent = {job_id: row for job_id, row in rows.items() if row["submitted_at"] is not None}
    assert {row["request_id"] for row in sent.values()} == timed_out
    for job_id, row in sent.items():
        assert row["attempts"] == 1
        assert row["error_type"] == "deadline"
        assert row["error"] == (
            "window closed: fal timed it out in its queue before it started (request_timeout); "
            f"not sent again before {deadline}"
        )
        assert any(f"accepted as {row['request_id']}" in str(e.reason) for e in histories[job_id])
    unsent = [row for job_id, row in rows.items() if job_id not in sent]
    assert len(unsent) == 2
    for row in unsent:
        assert (row["submitted_at"], row["attempts"], row["request_id"]) == (None, 0, None)
        assert row["error"] == f"not sent before {deadline}"
        assert not any("accepted as" in str(e.reason) for e in histories[row["job_id"]])


def _failures(engine: Engine, batch_id: str) -> dict[bool, FailureReason]:
    """The batch's ``status --json`` failure groups, by whether their jobs were sent."""
    with db.session_scope(engine) as session:
        failures = batches.batch_report(session, batch_id)["failures"]
    by_sending = {f["sent"]: f for f in failures}
    assert len(by_sending) == len(failures), failures
    return by_sending


def _failure_lines(engine: Engine, batch_id: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The failure lines ``status BATCH`` (and a run's end) prints for the batch."""
    with db.session_scope(engine) as session:
        report = batches.batch_report(session, batch_id)
    shown = io.StringIO()
    monkeypatch.setattr(output, "out", Console(file=shown, soft_wrap=True, highlight=False))
    monkeypatch.delenv("COLUMNS", raising=False)
    output.print_failures(report)
    return shown.getvalue().splitlines()


def test_the_deadline_summary_counts_requests_cancelled_in_fals_queue_apart_from_jobs_never_sent(
    engine: Engine, busy_sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An audit's overnight batch said "9 cancelled (deadline): cancelled in fal's queue at the
    batch's deadline" when only 5 had been sent: the failures were grouped by state and
    ``error_type`` alone, with one example for all. Sent and never sent are counted apart."""
    batch_id, rt = _two_waiting_at_fal(engine, busy_sim, "deadline-summary")
    wait_until(lambda: job_states(engine, batch_id).get("queued", 0) == 0, step=lambda: poll(rt))
    enforce_schedules(rt)  # the two never sent end cancelled too
    assert job_states(engine, batch_id) == {"running": 2, "cancelled": 4}

    lines = _failure_lines(engine, batch_id, monkeypatch)
    assert f"2 cancelled (deadline), sent to fal: {TIMED_OUT_AT_DEADLINE}" in lines
    assert any(line.startswith("2 cancelled (deadline), never sent: not sent before") for line in lines), (
        lines
    )
    failures = _failures(engine, batch_id)
    assert (failures[True]["error_type"], failures[True]["count"]) == ("deadline", 2)
    assert failures[True]["example"] == TIMED_OUT_AT_DEADLINE
    assert (failures[False]["error_type"], failures[False]["count"]) == ("deadline", 2)
    assert failures[False]["example"].startswith("not sent before the batch's deadline (")
    with db.session_scope(engine) as session:
        report = batches.batch_report(session, batch_id)
    assert (report["cancelled_for_deadline"], report["cancelled_for_deadline_sent"]) == (4, 2)
    assert output.deadline_cancelled_text(report) == (
        "4 job(s) cancelled by the deadline: 2 not sent before it; 2 sent to fal, their requests ended "
        "unfinished (see why below)"
    )


def test_a_request_timed_out_at_the_window_end_then_cut_off_by_the_deadline_costs_nothing(
    engine: Engine, busy_sim: SimulatorHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fal timed the request out unstarted at the window's end (not billed); the deadline then
    ended its job before a later window sent it again. Its cost is $0, as for every request that
    never ran — the export said null (unknown) — and the summary tells it from the jobs never
    sent (it said "not sent before the batch's deadline" of all of them)."""
    batch_id, rt = _two_waiting_at_fal(engine, busy_sim, "window-then-deadline-cost")
    _set_schedule(engine, batch_id, _closed_window(datetime.now(UTC)))
    wait_until(lambda: job_states(engine, batch_id).get("queued", 0) == 0, step=lambda: poll(rt))
    for job in _jobs(engine, batch_id, S.PENDING):
        if job.submitted_at is not None:  # timed out at fal: known to be unbilled, so $0
            assert (job.actual_usd, job.actual_billing_units) == (Decimal(0), Decimal(0))
    now = datetime.now(UTC)
    _set_schedule(engine, batch_id, Schedule(deadline=now))
    enforce_schedules(rt, now + timedelta(seconds=1))
    assert job_states(engine, batch_id) == {"running": 2, "cancelled": 4}

    with db.session_scope(engine) as session:
        batch = store.get_batch(session, batch_id)
        rows = [
            export.record(job, batch, tmp_path)
            for job in store.jobs_of_batch(session, batch_id)
            if job.state == S.CANCELLED
        ]
    assert sorted(row["attempts"] for row in rows) == [0, 0, 1, 1]
    assert [row["cost_usd"] for row in rows] == [0.0] * 4, rows
    assert all(row["billing_units"] == 0.0 for row in rows if row["attempts"]), rows
    failures = _failures(engine, batch_id)
    assert failures[True]["count"] == 2
    assert failures[True]["example"].startswith("window closed: fal timed it out in its queue")
    assert failures[False]["count"] == 2
    assert failures[False]["example"].startswith("not sent before the batch's deadline (")
    lines = _failure_lines(engine, batch_id, monkeypatch)
    assert sum(line.startswith("2 cancelled (deadline), sent to fal: window closed: ") for line in lines) == 1
    assert sum(line.startswith("2 cancelled (deadline), never sent: not sent before ") for line in lines) == 1


def test_a_request_ended_unstarted_at_a_window_end_costs_no_attempt_of_the_limit(engine: Engine) -> None:
    """Counted in ``attempts`` (it was sent), but not against WANBATCH_MAX_ATTEMPTS: with two
    attempts allowed, the job sent again in the next window may still fail once and be retried."""
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY, max_attempts=2))
    batch_id = add_batch(engine, "limit", [("fal-ai/wan-22", {"prompt": "limit"})])
    (job,) = _jobs(engine, batch_id, S.PENDING)
    with db.session_scope(engine) as session:
        for attempt in (1, 2):
            fence = store.Fence.of(store.get_job(session, job.id), "test")
            assert store.mark_submitting(
                session, fence, attempt=attempt, api_key_id="k", lease_expires_at=utcnow()
            )
            fence = fence.moved(S.SUBMITTING)
            assert store.mark_submitted(
                session,
                fence,
                running=False,
                request_id=f"request-{attempt}",
                gateway_request_id=None,
                status_url=None,
                response_url=None,
                cancel_url=None,
                submitted_at=utcnow(),
                next_poll_at=utcnow(),
            )
            fence = fence.moved(S.QUEUED)
            if attempt == 1:  # the window closed on it in fal's queue
                assert store.requeue_after_cancel(
                    session,
                    fence,
                    reason="window closed",
                    billed=False,
                    error="window closed",
                    error_type=None,
                )
        settle(session, rt, fence, RetryableProviderError("HTTP 503", status_code=503))
        job = store.get_job(session, job.id)
        assert (job.state, job.attempts, job.counted_attempts) == (S.RETRY_WAIT, 2, 1)


def _sent(session: Session, job_id: str, attempt: int) -> store.Fence:
    """Send the job as attempt ``attempt`` (stored as submit would): its fence, ``queued``."""
    fence = store.Fence.of(store.get_job(session, job_id), "test")
    assert store.mark_submitting(session, fence, attempt=attempt, api_key_id="k", lease_expires_at=utcnow())
    fence = fence.moved(S.SUBMITTING)
    assert store.mark_submitted(
        session,
        fence,
        running=False,
        request_id=f"request-{attempt}",
        gateway_request_id=None,
        status_url=None,
        response_url=None,
        cancel_url=None,
        submitted_at=utcnow(),
        next_poll_at=utcnow(),
    )
    return fence.moved(S.QUEUED)


def test_a_job_sent_again_after_unbilled_requests_costs_what_its_attempts_were_billed(engine: Engine) -> None:
    """A request fal ended unstarted at a window's end is known to be unbilled: the job holds
    $0, not "unknown", until a later attempt is billed, and then the sum of what each was billed
    (nothing is reset): timed out unstarted ($0), cancelled running at the next window's end
    (billed), timed out unstarted again, then ended unsent by the deadline."""
    batch_id = add_batch(engine, "resent", [("fal-ai/wan-22", {"prompt": "resent"})])
    (job_id,) = [j.id for j in _jobs(engine, batch_id, S.PENDING)]
    timed_out = Status("COMPLETED", error="timed out", error_type=START_TIMED_OUT)
    how = "fal timed it out in its queue before it started (request_timeout)"
    with db.session_scope(engine) as session:
        fence = _sent(session, job_id, 1)
        job = store.get_job(session, job_id)
        assert end_unstarted(session, fence, job, timed_out, why=WINDOW_CLOSED, how=how, now=utcnow())
        job = store.get_job(session, job_id)
        assert (job.state, job.actual_usd, job.actual_billing_units) == (S.PENDING, Decimal(0), Decimal(0))

        fence = _sent(session, job_id, 2)
        running = Outcome.CANCELLED_RUNNING
        cancelled = Status("COMPLETED", error="cancelled", error_type="client_cancelled")
        assert end_unstarted(
            session, fence, job, cancelled, why=WINDOW_CLOSED, how="cancelled", now=utcnow(), outcome=running
        )
        job = store.get_job(session, job_id)
        assert (job.state, job.actual_usd, job.actual_billing_units) == (
            S.RETRY_WAIT,
            Decimal("0.25"),
            Decimal(5),
        )

        fence = _sent(session, job_id, 3)
        assert end_unstarted(session, fence, job, timed_out, why=WINDOW_CLOSED, how=how, now=utcnow())
        job = store.get_job(session, job_id)
        assert (job.state, job.actual_usd, job.actual_billing_units) == (
            S.PENDING,
            Decimal("0.25"),
            Decimal(5),
        )

        store.cancel_unsent_jobs(
            session,
            [batch_id],
            reason="deadline",
            error="not sent",
            error_type="deadline",
            sent_error="not again",
        )
    (job,) = _jobs(engine, batch_id, S.CANCELLED)
    assert (job.actual_usd, job.actual_billing_units, job.attempts) == (Decimal("0.25"), Decimal(5), 3)
