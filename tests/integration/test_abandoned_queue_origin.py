"""A batch's requests sent to a fal queue URL nobody runs any more are not left queued for good.

Runs follow only the requests sent to their own queue (``Job.fal_origin``). When the user changes
``WANBATCH_FAL_QUEUE_URL`` between two runs of one batch (a proxy dropped for fal itself, a
stand-in's port changed), the next run of the batch was the only process left to follow the
requests the first one sent, and it never asked about them: their jobs stayed queued, with no
reason, and the run waited forever. A run that nothing else follows the batch beside now makes
them its own; a batch another live process follows keeps them that process's."""

from __future__ import annotations

from sqlalchemy import Engine, select, update

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs import db, store
from jobs.models import EVERY_BATCH, Job, utcnow
from tests.step_runtime import add_batch, job_ids, job_states, make_runtime, settings_for, wait_until
from worker.steps import dispatch, poll, submit
from worker.steps.dead_leases import DeadLeases

KEY = "abandoned-origin-key-3f8e"
GONE = "http://127.0.0.1:9"  # the queue the stopped run sent to: nobody runs it any more


def _sent_to(engine: Engine, batch_id: str, origin: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.batch_id == batch_id).values(fal_origin=origin))


def _origins(engine: Engine, batch_id: str) -> set[str | None]:
    with engine.connect() as conn:
        return set(conn.scalars(select(Job.fal_origin).where(Job.batch_id == batch_id)))


def test_a_run_follows_its_batch_requests_sent_to_a_queue_url_nobody_runs(engine: Engine) -> None:
    with running_simulator(SimulatorOptions(latency_seconds=0.3, latency_jitter=0.0)) as sim:
        settings = settings_for(sim.url, KEY)
        items = [("fal-ai/wan-22", {"prompt": f"p {i}"}) for i in range(3)]
        batch_id = add_batch(engine, "moved-queue", items)
        sender = make_runtime(engine, settings)
        for job_id in dispatch(sender):
            assert submit(sender, job_id) == "submitted"
        _sent_to(engine, batch_id, GONE)  # as sent through a URL this run is no longer given

        rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))  # the next run of it
        rt.dead_leases = DeadLeases(rt, batch_id)
        rt.dead_leases.take_back()
        wait_until(
            lambda: job_states(engine, batch_id).keys() <= {"succeeded", "downloading"},
            step=lambda: poll(rt),
        )
        assert _origins(engine, batch_id) == {rt.queue_origin}


def test_requests_of_a_batch_another_live_process_follows_stay_its_own(engine: Engine) -> None:
    with running_simulator(SimulatorOptions(latency_seconds=0.3, latency_jitter=0.0)) as sim:
        settings = settings_for(sim.url, KEY)
        batch_id = add_batch(engine, "two-queues", [("fal-ai/wan-22", {"prompt": "p"})])
        sender = make_runtime(engine, settings)
        for job_id in dispatch(sender):
            assert submit(sender, job_id) == "submitted"
        _sent_to(engine, batch_id, GONE)
        with db.session_scope(engine) as session:  # the distributed workers, on that queue
            store.record_heartbeat(session, "elsewhere:1:", [EVERY_BATCH], now=utcnow())
        rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
        rt.dead_leases = DeadLeases(rt, batch_id)
        rt.dead_leases.take_back()
        assert _origins(engine, batch_id) == {GONE}
        assert poll(rt) == 0


def test_a_request_id_a_job_of_this_queue_holds_is_not_taken_over(engine: Engine) -> None:
    with running_simulator(SimulatorOptions(latency_seconds=0.3, latency_jitter=0.0)) as sim:
        settings = settings_for(sim.url, KEY)
        batch_id = add_batch(
            engine, "reused-ids", [("fal-ai/wan-22", {"prompt": f"p {i}"}) for i in range(2)]
        )
        rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
        old, new = job_ids(engine, batch_id)
        with engine.begin() as conn:  # a seeded stand-in on another port gave the same id again
            for job_id, origin in ((old, GONE), (new, rt.queue_origin)):
                conn.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(state="queued", attempts=1, request_id="same-id", fal_origin=origin)
                )
        rt.dead_leases = DeadLeases(rt, batch_id)
        rt.dead_leases.take_back()
        with engine.connect() as conn:
            kept = conn.scalar(select(Job.fal_origin).where(Job.id == old))
        assert kept == GONE
