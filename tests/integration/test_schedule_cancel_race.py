"""A window end's or deadline's cancel and fal's answer to it, in every order.

:func:`~worker.steps.schedule.enforce_schedules` sends the cancel first, then stores the job's
``queued`` → ``cancelling``. fal's answer (``COMPLETED``, ``client_cancelled``: a 499 result)
can be seen in between, by a status stream or a poll, and a job fal started may have been seen
``running`` after the step read it as ``queued``. Whichever lands first, a job the schedule
cancelled ends as the schedule says: at the deadline ``cancelled`` (reason ``deadline``), at a
window's end back to ``pending`` (never started: no attempt counted) or ``retry_wait`` (fal had
started it) — never ``downloading`` → ``failed`` with HTTP 499 — and billed as fal bills a
cancel: nothing while queued, the time it ran once a runner took it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import Engine

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import db, store
from jobs.billing import Outcome, load_rules
from jobs.models import Job, utcnow
from jobs.schedule import Schedule
from jobs.states import JobState
from tests.step_runtime import add_batch, job_states, make_runtime, settings_for, wait_until
from worker.fal.models import CancelOutcome, RequestHandle, Status
from worker.steps import Runtime, dispatch, download, poll, submit
from worker.steps.poll import Seen, apply_seen
from worker.steps.schedule import closed_by, enforce_schedules

S = JobState
KEY = "schedule-race-key-0b7e"
EST_USD = Decimal("0.25")  # add_batch's estimate per job


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    """Two requests at once, each for a minute; a cancel stops a running one (billed)."""
    options = SimulatorOptions(
        concurrency_limit=2, latency_seconds=60.0, latency_jitter=0.0, cancel_stops_running=True, rng_seed=11
    )
    with running_simulator(options) as sim:
        yield sim


def _closed(why: str) -> Schedule:
    """The batch's schedule once fal has its requests: its deadline passed, or its window ended
    (a daily window that opens in two hours and lasts one)."""
    now = datetime.now(UTC)
    if why == "deadline":
        return Schedule(deadline=now - timedelta(seconds=1))
    start = (now + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    end = (now + timedelta(hours=3)).time().replace(second=0, microsecond=0)
    return Schedule(window=(start, end), timezone="UTC")


def _at_fal(engine: Engine, sim: SimulatorHandle, name: str, started: bool) -> tuple[str, Runtime, set[str]]:
    """A batch with requests at fal, and the jobs the schedule's cancel will ask about.

    ``started``: two requests fal has started, which no status has shown us (both ``queued``
    here); else four, two of them seen running and the two still in fal's queue (``queued``)."""
    rt = make_runtime(engine, settings_for(sim.url, KEY, max_outstanding=4))
    batch_id = add_batch(
        engine, name, [("fal-ai/wan-22", {"prompt": f"race {i}"}) for i in range(2 if started else 4)]
    )
    for job_id in dispatch(rt):
        assert submit(rt, job_id) == "submitted"
    if started:
        wait_until(lambda: all(e["started_at"] for e in sim.ledger()["entries"]), step=lambda: None)
        assert job_states(engine, batch_id) == {"queued": 2}
    else:
        wait_until(lambda: job_states(engine, batch_id).get("running") == 2, step=lambda: poll(rt))
        assert job_states(engine, batch_id) == {"running": 2, "queued": 2}
    with db.session_scope(engine) as session:
        queued = {j.id for j in store.jobs_of_batch(session, batch_id, states=[S.QUEUED])}
    return batch_id, rt, queued


def _hear(rt: Runtime, job_id: str, handle: RequestHandle, *, until: str, by: str = "stream") -> None:
    """fal's status of the job's request once it is ``until``, applied as a status stream's event
    (``by`` ``stream``) or read by a poll (``poll``: the job made due for one, and a round run)."""
    seen: list[Status] = []

    def read() -> bool:
        seen.append(rt.client.status(handle))
        return seen[-1].state == until

    wait_until(read, step=lambda: None)
    if by == "stream":
        assert apply_seen(rt, [Seen(job_id, handle.request_id, seen[-1])]) == 1
        return
    with db.session_scope(rt.engine) as session:
        before = store.get_job(session, job_id)
        assert store.status_due(session, store.Fence.of(before), at=utcnow())
    poll(rt)
    with db.session_scope(rt.engine) as session:
        assert store.get_job(session, job_id).version > before.version, "the poll did not read it"


ORDERS = {
    # fal's answer is heard after the cancel is sent, before the job's move to ``cancelling``.
    "answer-before-cancelling": ("queued", "started"),
    # The job was seen running after the step read it, then the cancel reached it.
    "seen-running-then-answer": ("started",),
    # The usual order: the job is ``cancelling`` when a poll reads fal's answer.
    "cancelling-then-answer": ("queued", "started"),
}
CASES = [
    pytest.param(why, order, setup, by, id=f"{why}-{order}-{setup}-{by}")
    for why in ("deadline", "window")
    for order, setups in ORDERS.items()
    for setup in setups
    for by in (("stream", "poll") if order == "answer-before-cancelling" else ("stream",))
]


@pytest.mark.parametrize(("why", "order", "setup", "by"), CASES)
def test_a_job_the_schedule_cancelled_ends_as_the_schedule_says_in_any_order(
    engine: Engine,
    sim: SimulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
    why: str,
    order: str,
    setup: str,
    by: str,
) -> None:
    """``by``: how fal's answer is heard before ``cancelling`` is stored (a stream, a poll)."""
    started = setup == "started"
    batch_id, rt, cancelled = _at_fal(engine, sim, f"race-{why}-{order}-{setup}-{by}", started)
    with db.session_scope(engine) as session:
        job_of = {j.request_id: j.id for j in store.jobs_of_batch(session, batch_id) if j.id in cancelled}
    real_cancel = rt.client.cancel

    def cancel(handle: RequestHandle) -> CancelOutcome:
        job_id = job_of[handle.request_id]
        if order == "seen-running-then-answer":
            _hear(rt, job_id, handle, until="IN_PROGRESS")  # seen `running` before the cancel goes
        outcome = real_cancel(handle)
        if order != "cancelling-then-answer":
            _hear(rt, job_id, handle, until="COMPLETED", by=by)  # heard before `cancelling` is stored
        return outcome

    monkeypatch.setattr(rt.client, "cancel", cancel)
    with db.session_scope(engine) as session:
        store.set_batch_schedule(session, batch_id, schedule=_closed(why), priority="normal")

    try:
        enforce_schedules(rt)
        wait_until(lambda: job_states(engine, batch_id).get("cancelling", 0) == 0, step=lambda: poll(rt))
        for job_id in cancelled:  # one taken for a finished request: its download says how it ended
            download(rt, job_id)
        if why == "window":
            assert dispatch(rt) == []  # the next window sends them again, not this one
    finally:
        rt.client.close()

    ledger = {e["request_id"]: e for e in sim.ledger()["entries"]}
    with db.session_scope(engine) as session:
        jobs: dict[str, Job] = {j.id: j for j in store.jobs_of_batch(session, batch_id) if j.id in cancelled}
        session.expunge_all()
    assert len(jobs) == 2
    ran_fraction = load_rules()[Outcome.CANCELLED_RUNNING]
    for job in jobs.values():
        assert job.request_id is not None  # it was sent, and keeps its request
        entry = ledger[job.request_id]
        assert entry["outcome"] == "cancelled"
        ran = entry["started_at"] is not None
        assert ran == started
        assert bool(entry["billed"]) == ran
        assert (job.actual_usd or 0) == (EST_USD * ran_fraction if ran else 0), job.actual_usd
        if why == "deadline":
            assert (job.state, job.error_type) == (S.CANCELLED, "deadline"), (job.state, job.error)
            assert job.error == (
                "cancelled at the batch's deadline while running at fal"
                if ran
                else "cancelled in fal's queue at the batch's deadline"
            )
        else:
            back = S.RETRY_WAIT if ran else S.PENDING
            assert (job.state, job.error_type) == (back, "window_closed"), (job.state, job.error)
            assert (job.error or "").startswith("window closed: cancelled at fal (client_cancelled)")
            assert (job.attempts, job.counted_attempts) == (1, 1 if ran else 0)
        with db.session_scope(engine) as session:
            assert not [e for e in store.job_events(session, job.id) if e.to_state == S.DOWNLOADING]


def test_closed_by_names_what_the_schedule_cancels_for() -> None:
    """What :func:`enforce_schedules` cancels for, and so how an early answer to it is read."""
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    hour = timedelta(hours=1)
    assert closed_by(Schedule(), now) is None
    assert closed_by(Schedule(deadline=now + hour), now) is None
    assert closed_by(Schedule(deadline=now), now) == "deadline"
    assert closed_by(Schedule(not_before=now + hour), now) is None  # nothing of it at fal yet
    inside = ((now - hour).time(), (now + hour).time())
    outside = ((now + hour).time(), (now + 2 * hour).time())
    assert closed_by(Schedule(window=inside), now) is None
    assert closed_by(Schedule(window=outside), now) == "window_closed"
    # Nothing opens before the deadline any more: closed, the deadline not yet passed.
    assert closed_by(Schedule(window=outside, deadline=now + hour / 2), now) == "window_closed"
    assert closed_by(Schedule(window=outside, deadline=now - hour), now) == "deadline"
