"""A simulation's request that the simulator of another live process accepted is unknown to this
run's simulator: its 404 proves nothing (that process follows the request), and the job is kept.
Once that process has ended, its simulator went with it: the request is lost indeed.

The other process is a child of the test (a live pid of this host), its claim on the batch
written as a ``--simulate`` process writes it (:func:`jobs.processes.simulation_owner`)."""

from __future__ import annotations

import socket
import subprocess
import sys

from sqlalchemy import Engine, update

from falsim.options import SimulatorOptions
from falsim.server import running_simulator
from jobs import db, processes, store
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, job_states, make_runtime, settings_for
from worker.limits import api_key_id
from worker.steps.poll import poll

KEY = "simulator-key"
OTHER = "http://127.0.0.1:9"  # the other process's simulator: never asked here


def _sent_elsewhere(engine: Engine, job_id: str, settings_key: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(
                state=JobState.QUEUED,
                attempts=1,
                request_id=f"theirs-{job_id}",
                api_key_id=settings_key,
                fal_origin=OTHER,
            )
        )


def test_a_404_about_another_live_simulators_request_keeps_the_job(engine: Engine) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = processes.started(child.pid)
        claim = f"{socket.gethostname()}:{child.pid}:{processes.SIMULATING} {start} {OTHER}"
        with running_simulator(SimulatorOptions(latency_seconds=0.1)) as sim:
            settings = settings_for(sim.url, KEY)
            batch = add_batch(engine, "elsewhere", [("fal-ai/wan-22", {"prompt": p}) for p in ("a", "b")])
            rt = make_runtime(engine, settings, batch_ids=frozenset({batch}), simulated=True)
            theirs, lost = job_ids(engine, batch)
            _sent_elsewhere(engine, theirs, api_key_id(settings))
            with db.session_scope(engine) as session:
                store.record_heartbeat(session, claim, [batch], utcnow())
            assert store_live(engine, batch) == {OTHER: child.pid}
            assert poll(rt) == 1
            assert job_states(engine, batch) == {"queued": 1, "pending": 1}
            # Ended: its simulator is gone, and so is the request.
            child.kill()
            child.wait(10)
            assert store_live(engine, batch) == {}
            with engine.begin() as conn:  # due again now
                conn.execute(update(Job).where(Job.id == theirs).values(next_attempt_at=None))
            assert poll(rt) == 1
            assert job_states(engine, batch) == {"failed": 1, "pending": 1}
            assert lost
    finally:
        child.kill()
        child.wait(10)


def store_live(engine: Engine, batch_id: str) -> dict[str, int]:
    with db.read_scope(engine) as session:
        return store.live_simulators(session, batch_id)
