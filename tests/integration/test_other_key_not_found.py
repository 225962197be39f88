"""fal's 404 about a request sent with another API key is no proof the request is lost: a key
of another account is told another account's request does not exist. Only a process with the
key the request was sent with may end the job on it (a key rotation keeps the old requests)."""

from __future__ import annotations

from sqlalchemy import Engine, update

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs.models import Job
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, job_states, make_runtime, settings_for
from worker.limits import api_key_id
from worker.steps.poll import poll

KEY = "test-key-rotated-new-5a1d"
OLD_KEY = "test-key-rotated-old-c93e"


def _sent(engine: Engine, job_id: str, key: str, origin: str) -> None:
    """The job as a submit with ``key`` to ``origin`` left it: queued at fal, as a request this
    simulator never had (so it answers 404)."""
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=JobState.QUEUED,
                attempts=1,
                request_id=f"gone-{job_id}",
                api_key_id=api_key_id(settings_for(origin, key)),
                fal_origin=origin,
            )
        )


def test_a_404_under_another_key_keeps_the_job_and_under_its_own_key_fails_it(engine: Engine) -> None:
    with running_simulator(SimulatorOptions(latency_seconds=0.1)) as sim:
        settings = settings_for(sim.url, KEY)
        rt = make_runtime(engine, settings)
        batch = add_batch(engine, "rotated", [("fal-ai/wan-22", {"prompt": p}) for p in ("old", "new")])
        old, new = job_ids(engine, batch)
        _sent(engine, old, OLD_KEY, rt.queue_origin)
        _sent(engine, new, KEY, rt.queue_origin)
        assert poll(rt) == 2
        # the job sent with the old key waits for a process with it; the other was lost indeed
        assert job_states(engine, batch) == {"queued": 1, "failed": 1}
        with engine.connect() as conn:
            kept = conn.execute(Job.__table__.select().where(Job.id == old)).one()
        assert kept.state == JobState.QUEUED
        assert kept.request_id == f"gone-{old}"
