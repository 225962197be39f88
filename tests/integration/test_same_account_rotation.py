"""A FAL_KEY rotated within one fal account (keys audit, t6): the new key may ask about the old
key's requests, and a run follows and finishes them with it. Before, every progress line and
``status --json`` still said they "were sent with another API key … and wait for a process with
that key" the whole time. Now the first good answer for this key (a status, a stream's event, a
result) records the request as this key's (``Job.api_key_id``): left out of that note, and counted
against this key's caps."""

from __future__ import annotations

from sqlalchemy import Engine, select, update

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs import db
from jobs.listing import elsewhere_waits
from jobs.models import Job
from jobs.states import JobState
from tests.step_runtime import add_batch, completion_heard, job_ids, make_runtime, settings_for, wait_until
from worker.here import process_here
from worker.limits import api_key_id
from worker.steps.poll import apply_seen, poll

NEW_KEY = "test-key-same-account-new-2b7e"
OLD_KEY = "test-key-same-account-old-e41c"


def _sent_with_old_key(engine: Engine, rt_old_url: str, job_id: str, request_id: str, origin: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=JobState.QUEUED,
                attempts=1,
                request_id=request_id,
                api_key_id=api_key_id(settings_for(rt_old_url, OLD_KEY)),
                fal_origin=origin,
            )
        )


def _keys(engine: Engine, batch_id: str) -> set[str | None]:
    with engine.connect() as conn:
        return set(conn.execute(select(Job.api_key_id).where(Job.batch_id == batch_id)).scalars())


def test_a_request_the_new_key_is_answered_about_is_followed_as_its_own(engine: Engine) -> None:
    # latency: the status poll sees it queued or running; the stream's completion comes later
    with running_simulator(SimulatorOptions(latency_seconds=0.3, latency_jitter=0.0)) as sim:
        old = make_runtime(engine, settings_for(sim.url, OLD_KEY))
        rt = make_runtime(engine, settings_for(sim.url, NEW_KEY))
        batch = add_batch(
            engine, "rotated", [("fal-ai/wan-22", {"prompt": p}) for p in ("polled", "streamed")]
        )
        polled, streamed = job_ids(engine, batch)
        for job_id in (polled, streamed):
            accepted = old.client.submit("fal-ai/wan-22", {"prompt": job_id})
            _sent_with_old_key(engine, sim.url, job_id, accepted.request_id, rt.queue_origin)
        here = process_here(rt.settings)
        with db.read_scope(engine) as session:
            (wait,) = elsewhere_waits(session, [batch], here)[batch]
        assert (wait.reason, wait.jobs) == ("api_key", 2)

        # A status poll answered for the new key: that job is the new key's now.
        assert poll(rt, exclude={streamed}) == 1
        mine = api_key_id(rt.settings)
        with db.read_scope(engine) as session:
            (wait,) = elsewhere_waits(session, [batch], here)[batch]
            assert session.get(Job, polled).api_key_id == mine  # type: ignore[union-attr]
        assert wait.jobs == 1

        # A stream's event answered for the new key: the other one too; nothing waits elsewhere.
        handle = rt.client.handle("fal-ai/wan-22", _request_of(engine, streamed))
        wait_until(lambda: rt.client.status(handle).completed, step=lambda: None)
        seen = completion_heard(engine, rt, streamed)
        assert apply_seen(rt, [seen]) == 1
        with db.read_scope(engine) as session:
            assert elsewhere_waits(session, [batch], here) == {}
        assert _keys(engine, batch) == {mine}
        assert rt.other_keys.stranded() == []


def _request_of(engine: Engine, job_id: str) -> str:
    with engine.connect() as conn:
        found = conn.execute(select(Job.request_id).where(Job.id == job_id)).scalar_one()
    assert found is not None
    return str(found)
