"""A ``wanbatch worker`` asked to stop says what its warm shutdown waits for.

Audit: Celery's warm shutdown (SIGTERM) waits for the tasks whose submit POST is on its way to
fal — rightly: their answers carry the request ids of paid requests — but said nothing while it
did; one took 17.6 s, past Docker's default 10 s grace, which then kills the worker mid-POST.
Now the first signal logs once how many submits it waits for, and how long at most. One real
``wanbatch worker`` (threads pool) on PostgreSQL and a Redis DB of its own, the simulator
holding the one POST (``submit_slow``).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from bench.distributed import Scenario, claimed_redis_db, environment, start_workers, stop_processes, tail
from bench.distributed import wanbatch_command as wanbatch
from falsim import FaultRule, SimulatorOptions, running_simulator

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

MANIFEST = "name: warm-stop\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a lighthouse at dusk\n"


def test_a_warm_shutdown_says_which_submits_it_waits_for(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "manifest.yaml").write_text(MANIFEST)
    logs = tmp_path / "logs"
    logs.mkdir()
    scenario = Scenario(jobs=1, workers=1, concurrency=2, cap=4, latency=0.1, sim_concurrency=4)
    database = new_pg_database()
    held = {"submit_slow": FaultRule(next=1, params={"delay": 4})}  # the POST answered 4 s late
    options = SimulatorOptions(latency_seconds=0.1, latency_jitter=0.0, faults=held)
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker, running_simulator(options) as sim:
        env = environment(scenario, database, broker, sim.url, tmp_path / "outputs")
        env["WANBATCH_READ_TIMEOUT"] = "30"
        done = subprocess.run(
            [*wanbatch(), "submit", str(tmp_path / "manifest.yaml")],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        workers = start_workers(scenario, env, tmp_path, logs)
        try:
            deadline = time.monotonic() + 120
            while not sim.engine.faults.fired.get("submit_slow"):
                assert workers[0].poll() is None, tail(logs / "worker-0.log")
                assert time.monotonic() < deadline, "the POST never reached the simulator"
                time.sleep(0.1)
            workers[0].send_signal(signal.SIGTERM)
            code = workers[0].wait(timeout=60)
        finally:
            stop_processes(workers)
        log = (logs / "worker-0.log").read_text(errors="replace")
        assert code == 0, log
        said = (
            "warm shutdown: waiting for 1 submit(s) already sent to fal to be answered (up to 70s: "
            "WANBATCH_CONNECT_TIMEOUT + twice WANBATCH_READ_TIMEOUT)"
        )
        assert log.count(said) == 1, log
        # The answer it waited for is recorded: the request id kept, the job at fal once.
        engine = create_engine(database)
        try:
            with engine.connect() as conn:
                request_id = conn.execute(text("SELECT request_id FROM jobs")).scalar_one()
        finally:
            engine.dispose()
        assert request_id is not None, log
        assert len(sim.ledger()["entries"]) == 1
