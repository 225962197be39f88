"""A download handed straight to a process (a stored webhook applied by workers, ``serve``)
fetches no result of a request sent to another fal queue.

Runs on other fal queues share one database (``Job.fal_origin``): poll, streams, cancels and the
download scheduler leave the other queue's requests alone, but a download task took whatever job
it was handed. A webhook of a run on queue A, applied by a process on queue B, queued the
download there: B's fal answered 404 for a request it never had, and a paid video ended
"result expired". Now such a download is left to a process of that queue, untouched."""

from __future__ import annotations

from sqlalchemy import Engine, select, update

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.limits import api_key_id
from worker.steps import download

KEY = "other-queue-download-key-61c2"
ELSEWHERE = "http://127.0.0.1:9"  # the queue the request went to: not this process's


def test_a_download_of_a_request_sent_to_another_queue_is_left_to_that_queue(engine: Engine) -> None:
    with running_simulator(SimulatorOptions(latency_seconds=0.1)) as sim:
        settings = settings_for(sim.url, KEY)
        rt = make_runtime(engine, settings)
        batch_id = add_batch(engine, "other-queue", [("fal-ai/wan-22", {"prompt": "p"})])
        (job_id,) = job_ids(engine, batch_id)
        with engine.begin() as conn:  # completed at queue ELSEWHERE, as its webhook said
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    state=JobState.DOWNLOADING,
                    attempts=1,
                    request_id=f"theirs-{job_id}",
                    api_key_id=api_key_id(settings),
                    fal_origin=ELSEWHERE,
                    submitted_at=utcnow(),
                    completed_at=utcnow(),
                )
            )
        download(rt, job_id)
        with engine.connect() as conn:
            job = conn.execute(select(Job.state, Job.error).where(Job.id == job_id)).one()
        assert job.state == JobState.DOWNLOADING, job.error
        assert sim.ledger()["accepted"] == 0
