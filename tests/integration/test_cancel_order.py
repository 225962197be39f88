"""Cancel: nothing queued at fal is billed, and a 100,000-job batch is cancelled set-based.

fal runs a few requests per account and queues the rest; a cancel is free while a request is
IN_QUEUE and billed once it runs. Cancelling a *running* request frees a slot, and fal at once
starts the next queued one — so cancelling in job order (running ones first) turns queued,
free cancels into running, billed ones. The simulator (an account running 2 at once) and its
ledger show what fal would bill.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from sqlalchemy import Engine, func, select

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import db, store
from jobs.models import BatchState, Job, JobEvent, utcnow
from jobs.schedule import Schedule
from jobs.states import JobState
from tests.step_runtime import add_batch, job_states, make_runtime, settings_for, wait_until
from worker.fal.models import Status
from worker.steps import Runtime, cancel_jobs_of_cancelled_batches, dispatch, poll, submit
from worker.steps.poll import record_completion
from worker.steps.schedule import enforce_schedules

S = JobState
KEY = "cancel-order-key-7d41a9"


@pytest.fixture
def slow_sim() -> Iterator[SimulatorHandle]:
    """An account that runs 2 requests at once, each for 5 s, and stops a runner on cancel."""
    options = SimulatorOptions(
        concurrency_limit=2, latency_seconds=5.0, latency_jitter=0.0, cancel_stops_running=True, rng_seed=9
    )
    with running_simulator(options) as sim:
        yield sim


def test_cancel_never_bills_a_request_that_was_queued(engine: Engine, slow_sim: SimulatorHandle) -> None:
    settings = settings_for(slow_sim.url, KEY, max_outstanding=8)
    rt = make_runtime(engine, settings)
    batch_id = add_batch(
        engine, "cancel-order", [("fal-ai/wan-22", {"prompt": f"boat {i}"}) for i in range(8)]
    )
    try:
        claimed = dispatch(rt)
        assert len(claimed) == 8
        for job_id in claimed:  # in job order: jobs 0 and 1 run at fal, 2…7 wait in its queue
            assert submit(rt, job_id) == "submitted"
        wait_until(lambda: job_states(engine, batch_id) == {"running": 2, "queued": 6}, step=lambda: poll(rt))

        before = slow_sim.ledger()
        waiting = {e["request_id"] for e in before["entries"] if e["started_at"] is None}
        assert len(waiting) == 6
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")

        def one_round() -> None:
            cancel_jobs_of_cancelled_batches(rt)
            poll(rt)

        wait_until(lambda: job_states(engine, batch_id) == {"cancelled": 8}, step=one_round)
    finally:
        rt.client.close()

    entries = {e["request_id"]: e for e in slow_sim.ledger()["entries"]}
    assert len(entries) == 8
    for request_id in waiting:
        entry = entries[request_id]
        assert entry["outcome"] == "cancelled"
        assert entry["started_at"] is None, f"{request_id} was queued when the cancel began, then started"
        assert not entry["billed"], f"{request_id} was queued when the cancel began, yet billed"
    # Only the two that were already running may have cost anything.
    assert sum(e["billed"] for e in entries.values()) <= 2


def _all_sent_none_polled(engine: Engine, sim: SimulatorHandle, name: str) -> tuple[str, Runtime, set[str]]:
    """8 jobs sent to an account running 2 at once and never polled: all 8 ``queued`` in the
    database, while fal runs the 2 oldest. Gives the request ids still in fal's queue."""
    rt = make_runtime(engine, settings_for(sim.url, KEY, max_outstanding=8))
    batch_id = add_batch(engine, name, [("fal-ai/wan-22", {"prompt": f"lag {i}"}) for i in range(8)])
    claimed = dispatch(rt)
    assert len(claimed) == 8
    for job_id in claimed:
        assert submit(rt, job_id) == "submitted"
    assert job_states(engine, batch_id) == {"queued": 8}
    waiting = {e["request_id"] for e in sim.ledger()["entries"] if e["started_at"] is None}
    assert len(waiting) == 6
    return batch_id, rt, waiting


def _none_billed_of(sim: SimulatorHandle, waiting: set[str]) -> None:
    entries = {e["request_id"]: e for e in sim.ledger()["entries"]}
    for request_id in waiting:
        entry = entries[request_id]
        assert entry["outcome"] == "cancelled"
        assert not entry["billed"], f"{request_id} was queued when the cancel began, yet billed"
        assert entry["started_at"] is None, f"{request_id} was queued when the cancel began, then started"


def test_a_cancel_from_a_lagging_database_bills_none_of_the_queued(
    engine: Engine, slow_sim: SimulatorHandle
) -> None:
    """Our ``queued`` lags fal: the 2 oldest run there already. Cancelling oldest first would
    free their slots to our next queued requests just before their own cancels arrive; newest
    first (the tail of fal's FIFO queue), no request that waited is started, nor billed."""
    batch_id, rt, waiting = _all_sent_none_polled(engine, slow_sim, "cancel-lag")
    try:
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")

        def one_round() -> None:
            cancel_jobs_of_cancelled_batches(rt)
            poll(rt)

        wait_until(lambda: job_states(engine, batch_id) == {"cancelled": 8}, step=one_round)
    finally:
        rt.client.close()
    _none_billed_of(slow_sim, waiting)


def test_a_deadline_from_a_lagging_database_bills_none_of_the_queued(
    engine: Engine, slow_sim: SimulatorHandle
) -> None:
    """The same at a batch's deadline: its queued requests are cancelled from the tail of fal's queue."""
    batch_id, rt, waiting = _all_sent_none_polled(engine, slow_sim, "deadline-lag")
    try:
        now = datetime.now(UTC)
        with db.session_scope(engine) as session:
            store.set_batch_schedule(
                session, batch_id, schedule=Schedule(deadline=now + timedelta(seconds=1)), priority="normal"
            )
        assert enforce_schedules(rt, now + timedelta(seconds=2)) == 8
        wait_until(lambda: job_states(engine, batch_id).get("cancelling", 0) == 0, step=lambda: poll(rt))
    finally:
        rt.client.close()
    _none_billed_of(slow_sim, waiting)


def test_unsent_jobs_are_cancelled_set_based_with_their_events(engine: Engine) -> None:
    batch_id = add_batch(engine, "mixed", [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(6)])
    other_id = add_batch(engine, "untouched", [("fal-ai/wan-22", {"prompt": "q"})])
    with db.session_scope(engine) as session:
        jobs = list(store.jobs_of_batch(session, batch_id))
        now = utcnow()
        # 0, 1 stay pending; 2 waits to be retried; 3 is mid-submit (a worker holds it).
        store.transition(session, jobs[2].id, S.PENDING, S.SUBMITTING, reason="t")
        store.transition(session, jobs[2].id, S.SUBMITTING, S.RETRY_WAIT, reason="t", next_attempt_at=now)
        store.transition(session, jobs[3].id, S.PENDING, S.SUBMITTING, reason="t")
        # 4 had an ambiguous submit.
        store.transition(session, jobs[4].id, S.PENDING, S.SUBMITTING, reason="t")
        store.transition(session, jobs[4].id, S.SUBMITTING, S.SUBMIT_UNKNOWN, reason="t")
        store.set_batch_state(session, batch_id, BatchState.CANCELLED)
    with db.session_scope(engine) as session:
        versions = {j.id: j.version for j in store.jobs_of_batch(session, batch_id)}
        moved = store.cancel_unsent_jobs(
            session, [batch_id], reason="batch cancelled", error="cancelled by user", error_type="cancelled"
        )
    assert moved == 5
    with db.session_scope(engine) as session:
        after = {j.id: j for j in store.jobs_of_batch(session, batch_id)}
        assert after[jobs[3].id].state == S.SUBMITTING  # fal may be receiving it: not ours to end here
        for job in jobs[:3] + jobs[4:]:
            row = after[job.id]
            assert row.state == S.CANCELLED
            assert row.version == versions[job.id] + 1
            assert row.finished_at is not None
            assert (row.error, row.error_type) == ("cancelled by user", "cancelled")
            last = store.job_events(session, job.id)[-1]
            assert (last.to_state, last.version, last.reason) == (S.CANCELLED, row.version, "batch cancelled")
        froms = {job.id: store.job_events(session, job.id)[-1].from_state for job in jobs}
        assert froms[jobs[0].id] == S.PENDING
        assert froms[jobs[2].id] == S.RETRY_WAIT
        assert froms[jobs[4].id] == S.SUBMIT_UNKNOWN
        assert store.counts_by_state(session, other_id)["pending"] == 1
        # Nothing left to cancel: a second call (every tick makes one) changes nothing.
        assert (
            store.cancel_unsent_jobs(session, [batch_id], reason="x", error="x", error_type="cancelled") == 0
        )


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_cancelling_100k_jobs_is_set_based(engine: Engine) -> None:
    n = 100_000
    batch_id = add_batch(engine, "huge", [("fal-ai/wan-22", {"prompt": "p"})] * n)
    with db.session_scope(engine) as session:
        store.set_batch_state(session, batch_id, BatchState.CANCELLED)
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY))  # nothing at fal: never called
    try:
        started = time.perf_counter()
        moved = cancel_jobs_of_cancelled_batches(rt)
        took = time.perf_counter() - started
    finally:
        rt.client.close()
    print(f"cancelled {n:,} unsent jobs in {took:.2f}s")
    assert moved == n
    assert job_states(engine, batch_id) == {"cancelled": n}
    with db.session_scope(engine) as session:
        events = session.execute(
            select(JobEvent.from_state, JobEvent.to_state, JobEvent.version, func.count())
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.batch_id == batch_id)
            .group_by(JobEvent.from_state, JobEvent.to_state, JobEvent.version)
        ).all()
    assert [(f, t, v, c) for f, t, v, c in events] == [(S.PENDING, S.CANCELLED, 1, n)]


@pytest.mark.parametrize("seen", [True, False])
def test_a_cancel_without_metrics_is_billed_by_what_we_saw_of_the_request(engine: Engine, seen: bool) -> None:
    """fal's answer to our cancel may carry no ``metrics`` (legacy apps send none; webhooks never
    do): a request we saw IN_PROGRESS ran, and fal billed it; one never seen running is not."""
    batch_id = add_batch(engine, "no-metrics", [("fal-ai/wan-22", {"prompt": "p"})])
    path = [S.SUBMITTING, S.QUEUED, *([S.RUNNING] if seen else []), S.CANCELLING]
    with db.session_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
        for before, after in pairwise([S.PENDING, *path]):
            assert store.transition(session, job.id, before, after, reason="t")
    with db.session_scope(engine) as session:
        job = store.get_job(session, job.id)
        cancelled = Status(
            state="COMPLETED", error="Request cancelled by client", error_type="client_cancelled"
        )
        fence = store.Fence.of(job, "poller")
        assert not record_completion(session, fence, cancelled, now=utcnow())
    with db.session_scope(engine) as session:
        ended = store.get_job(session, job.id)
        assert (ended.state, ended.error) == (S.CANCELLED, "cancelled by user")
        assert ended.actual_usd == (ended.est_usd if seen else 0)
