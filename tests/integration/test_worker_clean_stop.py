"""A cleanly stopped ``wanbatch worker`` deletes its heartbeat, as a stopped ``run`` does.

``conductor_heartbeats``: "a process that stops cleanly deletes its rows; one that dies leaves
them to go stale". A worker stopped by SIGTERM or SIGINT (Celery's warm shutdown) left its
leader's row behind, so ``status`` said ``processing: true`` for a minute after the last worker
stopped, and then "nothing is processing it (last seen 1m ago)" — the words the README keeps for
a crash. One real ``wanbatch worker`` on PostgreSQL and a Redis DB of its own, a batch waiting
for a window far away (so nothing is sent), then the signal. Its record on Redis
(:mod:`worker.peers`) goes too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text

from bench.distributed import Scenario, claimed_redis_db, environment, start_workers, stop_processes, tail
from bench.distributed import wanbatch_command as wanbatch
from falsim import SimulatorOptions, running_simulator
from worker.limits import KEY_PREFIX

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

MANIFEST = """\
name: clean-stop
endpoint: fal-ai/wan-22
schedule:
  not_before: 2099-01-01T00:00:00Z
items:
  - prompt: a lighthouse at dusk
"""


def _cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*wanbatch(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _records(broker: str) -> list[bytes]:
    """The workers' records (``host:pid:``) on the broker's Redis, every database's."""
    client = redis.Redis.from_url(broker)
    try:
        return [field for key in client.scan_iter(f"{KEY_PREFIX}*:workers") for field in client.hkeys(key)]
    finally:
        client.close()


def _json(env: dict[str, str], cwd: Path, *args: str) -> dict[str, Any]:
    done = _cli(env, cwd, *args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_worker_stopped_by_a_signal_leaves_no_heartbeat_and_status_says_so(
    sig: signal.Signals, new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "manifest.yaml").write_text(MANIFEST)
    logs = tmp_path / "logs"
    logs.mkdir()
    scenario = Scenario(jobs=1, workers=1, concurrency=1, cap=4, latency=0.1, sim_concurrency=4)
    database = new_pg_database()
    engine = create_engine(database)
    redis_base = redis_url.rsplit("/", 1)[0]
    with claimed_redis_db(redis_base) as broker, running_simulator(SimulatorOptions()) as sim:
        env = environment(scenario, database, broker, sim.url, tmp_path / "outputs")
        batch = _json(env, tmp_path, "submit", str(tmp_path / "manifest.yaml"))["batch"]
        workers = start_workers(scenario, env, tmp_path, logs)
        try:
            beats = 0
            deadline = time.monotonic() + 120
            while beats == 0 and time.monotonic() < deadline:
                assert workers[0].poll() is None, tail(logs / "worker-0.log")
                time.sleep(0.2)
                with engine.connect() as conn:
                    beats = conn.execute(text("SELECT count(*) FROM conductor_heartbeats")).scalar_one()
            assert beats > 0, "the worker's leader never beat:\n" + tail(logs / "worker-0.log")
            # Its record on Redis (worker.peers): there while it runs, gone after a clean stop,
            # or `status` would name it gone once the record went stale.
            while not _records(broker) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(_records(broker)) == 1, _records(broker)
            assert _json(env, tmp_path, "status", batch)["processing"] is True

            workers[0].send_signal(sig)
            code = workers[0].wait(timeout=60)
        finally:
            stop_processes(workers)
        log = tail(logs / "worker-0.log")
        assert code == 0, log
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT owner, scope FROM conductor_heartbeats")).all()
        engine.dispose()
        assert rows == [], log
        assert _records(broker) == [], log

        report = _json(env, tmp_path, "status", batch)
        assert (report["processing"], report["processed_at"]) == (False, None)
        shown = _cli(env, tmp_path, "status", batch)
        assert "nothing is processing it" in shown.stdout, shown.stdout
        assert "last seen" not in shown.stdout, shown.stdout
