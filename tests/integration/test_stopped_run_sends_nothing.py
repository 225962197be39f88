"""A run that stops sends no new submit while it waits for the answers of those already out.

The stop now waits for fal's answers up to ``WANBATCH_READ_TIMEOUT`` (it waited 3 s, and the
answers that came later were lost: their jobs failed ``submit_unknown``, paid for). A submit step
that had got past its lease as the stop began would then have sent a new POST — billed, with
nobody waiting for its answer. It gives its job back unsent instead, due at once for the next run.
"""

from __future__ import annotations

from sqlalchemy import Engine

from jobs import db, store
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import dispatch, submit

T2V = "fal-ai/wan-22"
KEY = "4b2e9d1c-7a3f-4e5d-9c8b-1a2b3c4d5e6f:9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b"


def test_a_claimed_job_goes_back_unsent_once_the_run_stops(engine: Engine, hostile: HostileProvider) -> None:
    hostile.route("POST", rf"/{T2V}", json_reply({"request_id": "never-used"}))
    batch_id = add_batch(engine, "stopping", [(T2V, {"prompt": "a lighthouse"})])
    rt = make_runtime(engine, settings_for(hostile.url, KEY))
    try:
        (job_id,) = dispatch(rt)
        assert rt.unrecorded.stop_sending() == 0  # Ctrl-C: nothing more goes out
        assert submit(rt, job_id) == "stopped"
    finally:
        rt.client.close()
    assert hostile.count("POST", rf"/{T2V}") == 0
    with db.read_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
    unsent = (job.state, job.submitted_input, job.sent_at, job.lease_owner)
    assert unsent == (JobState.PENDING, None, None, None)
    assert job.attempts == 0  # not counted: nothing was sent
