"""With workers, requests of another fal account's key end ``run`` and ``cancel`` (exit 2), as
embedded (review of the other-key merge, defect 2).

Before: fal's 404 of such a request was noted in the memory of the worker that asked only. The
``run`` watching the workers never learned it and waited for ever; ``cancel`` said "2 at fal
being cancelled there" (nothing was: fal does not know them for this key) and exit 1; and each
worker logged a "not taken as final" warning at every poll, for ever. Now the refusal is noted
in the database (``key_refusals``), from which the watcher and ``cancel`` compute them; the
worker warns once per request, at debug level after. ``cancel --abandon-other-key`` then writes
them off (it asks fal first, with its own key: 404 again).

One real ``wanbatch worker`` on PostgreSQL and a Redis DB of its own; the simulator plays fal for
the new key's account: it never had the old key's requests, so it answers 404 about them.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from bench.distributed import Scenario, claimed_redis_db, environment, start_workers, stop_processes, tail
from bench.distributed import wanbatch_command as wanbatch
from falsim import SimulatorOptions, running_simulator
from jobs.settings import Settings
from worker.here import queue_origin
from worker.limits import api_key_id

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(400)]

OLD_KEY = "test-key-old-account-9d41"
NEW_KEY = "test-key-new-account-77aa"

MANIFEST = """\
name: rot
endpoint: fal-ai/wan-22
items:
  - prompt: one
  - prompt: two
"""


def _key_id(key: str) -> str:
    return api_key_id(Settings(FAL_KEY=SecretStr(key)))


def _cli(
    env: dict[str, str], cwd: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*wanbatch(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_run_and_cancel_with_workers_end_on_another_accounts_requests(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    (tmp_path / "m.yaml").write_text(MANIFEST)
    logs = tmp_path / "logs"
    logs.mkdir()
    scenario = Scenario(jobs=2, workers=1, concurrency=2, cap=4, latency=0.2, sim_concurrency=4)
    database = new_pg_database()
    redis_base = redis_url.rsplit("/", 1)[0]
    old_id, new_id = _key_id(OLD_KEY), _key_id(NEW_KEY)
    fal = SimulatorOptions(latency_seconds=0.2)
    with claimed_redis_db(redis_base) as broker, running_simulator(fal) as sim:
        env = environment(scenario, database, broker, sim.url, tmp_path / "outputs")
        env.update(FAL_KEY=NEW_KEY, WANBATCH_POLL_MAX_INTERVAL="1", WANBATCH_TICK_INTERVAL="0.1")
        submitted = _cli(env, tmp_path, "submit", "m.yaml", "--json")
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        # What the batch looks like after workers with OLD_KEY (another fal account) sent both.
        engine = create_engine(database)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE jobs SET state = 'queued', attempts = 1, request_id = 'old-account-' || id, "
                    "api_key_id = :key, fal_origin = :origin, submitted_at = now(), sent_at = now()"
                ),
                {"key": old_id, "origin": queue_origin(sim.url)},
            )
        workers = start_workers(scenario, env, tmp_path, logs)
        try:
            ran = _cli(env, tmp_path, "run", "rot", "--json", "--no-progress", timeout=150)
            log = tail(logs / "worker-0.log")
            assert ran.returncode == 2, ran.stdout + ran.stderr + log
            report = json.loads(ran.stdout)
            assert report["ok"] is False
            assert (
                f"2 request(s) of this batch were sent with another API key (2 with key id {old_id})"
                in (report["error"])
            )
            assert f"this FAL_KEY (key id {new_id})" in report["error"]
            assert {o["key_id"] for o in report["other_key"]} == {old_id}
            assert report["counts"]["queued"] == 2

            cancelled = _cli(env, tmp_path, "cancel", "rot", "--json", "--no-progress")
            assert cancelled.returncode == 2, cancelled.stdout + cancelled.stderr
            assert "0 at fal being cancelled there" in cancelled.stderr, cancelled.stderr
            said = json.loads(cancelled.stdout)
            assert said["ok"] is False
            assert "`wanbatch cancel rot --abandon-other-key`" in said["error"]
            assert {o["key_id"] for o in said["other_key"]} == {old_id}

            time.sleep(4)  # a few more polls (every 1 s) and the worker's cancels of both
            lines = (logs / "worker-0.log").read_text(errors="replace").splitlines()
            # one warning per request, not one per poll
            assert sum("not taken as final" in line for line in lines) == 2, "\n".join(lines[-60:])
            assert sum("to the cancel of request" in line for line in lines) <= 2, "\n".join(lines[-60:])

            abandoned = _cli(env, tmp_path, "cancel", "rot", "--abandon-other-key", "--json", "--no-progress")
            assert abandoned.returncode == 1, abandoned.stdout + abandoned.stderr
            assert "2 request(s) sent with another API key" in abandoned.stderr
            assert json.loads(abandoned.stdout)["counts"]["failed"] == 2
        finally:
            stop_processes(workers)
            engine.dispose()
        for shown in (ran, cancelled, abandoned):
            assert OLD_KEY not in shown.stdout + shown.stderr
            assert NEW_KEY not in shown.stdout + shown.stderr
