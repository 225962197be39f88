"""Issue #11, distributed: what the cheaper worker keeps — one real ``wanbatch worker`` per pool.

* The default pool is threads: the tasks run beside the ticker, and while it leads they tell its
  conductor directly — not one ``submitted``/``freed`` notice crosses the database — and every
  job still completes exactly once.
* ``--pool prefork`` still works: its children are other processes, so they tell the leader over
  the database (a ``submitted`` notice per accepted job).
* Either way Flower still sees every task: a receiver on the broker, as Flower's, gets
  ``task-received``, ``task-started`` and ``task-succeeded`` for each one (the worker publishes
  them in bunches, :class:`worker.task_events.BatchedTaskEvents`).
* A process forked from one whose ticker leads never takes the parent's conductor for its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import create_engine, text

from bench.distributed import (
    Scenario,
    claimed_redis_db,
    environment,
    start_workers,
    stop_processes,
    tail,
    wanbatch_command,
    write_manifest,
)
from falsim import SimulatorOptions, running_simulator
from tests.celery_events import EventTap
from worker import tasks
from worker.notifications import EventListener

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

TASK_EVENTS = ("task-received", "task-started", "task-succeeded")


class NoticeTap:
    """Every notice sent over the database's events channel while it runs."""

    def __init__(self, database_url: str) -> None:
        self.listener = EventListener(database_url)
        self.payloads: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.payloads.extend(self.listener.wait(0.2))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.listener.close()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_tells_its_own_leader_directly_and_flower_sees_every_task(
    pool: str, new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    scenario = Scenario(
        jobs=10,
        workers=1,
        concurrency=2,
        cap=4,
        latency=0.1,
        sim_concurrency=4,
        pool=None if pool == "threads" else pool,
    )
    manifest = write_manifest(tmp_path, scenario.jobs, name=f"pool-{pool}")
    logs = tmp_path / "logs"
    logs.mkdir()
    options = SimulatorOptions(concurrency_limit=scenario.sim_concurrency, latency_seconds=scenario.latency)
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker, running_simulator(options) as sim:
        database = new_pg_database()
        env = environment(scenario, database, broker, sim.url, tmp_path / "outputs")
        submitted = subprocess.run(
            [*wanbatch_command(), "submit", str(manifest), "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submitted.returncode == 0, submitted.stderr
        batch = json.loads(submitted.stdout)["batch"]
        events = EventTap(broker)
        events.wait_listening()  # the receiver's subscription is in place before the worker starts
        notices = NoticeTap(database)
        workers = start_workers(scenario, env, tmp_path, logs)
        engine = create_engine(database)
        try:
            deadline = time.monotonic() + 180
            finished = 0
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    finished = conn.execute(
                        text("SELECT count(*) FROM jobs WHERE batch_id = :b AND state = 'succeeded'"),
                        {"b": batch},
                    ).scalar_one()
                done = [e for e in events.task_events().values() if "task-succeeded" in e]
                # every job: a submit and a download task, each with its events
                if finished == scenario.jobs and len(done) == 2 * scenario.jobs:
                    break
                assert workers[0].poll() is None, tail(logs / "worker-0.log")
                time.sleep(0.2)
            with engine.connect() as conn:
                job_ids = set(
                    conn.execute(text("SELECT id FROM jobs WHERE batch_id = :b"), {"b": batch}).scalars()
                )
        finally:
            codes = stop_processes(workers)
            notices.stop()
            events.stop()
            engine.dispose()
        ledger = sim.ledger()
    assert finished == scenario.jobs, tail(logs / "worker-0.log")
    assert ledger["accepted"] == scenario.jobs
    assert ledger["duplicates"] == []
    assert codes == [0]

    told = [p for p in notices.payloads if p.partition(":")[0] in ("submitted", "freed")]
    if pool == "threads":
        assert told == [], "the leader is in this process: its tasks tell it directly"
    else:
        assert {p.partition(":")[2] for p in told if p.startswith("submitted:")} == job_ids

    seen = events.task_events()
    assert len(seen) == 2 * scenario.jobs, seen
    for uuid, kinds in seen.items():
        assert set(TASK_EVENTS) <= kinds, (uuid, kinds)


class _Conductor:
    """Stands in for the ticker's conductor: it is never to be reached from another process."""

    def notify(self, kind: str, job_id: str) -> None:
        raise AssertionError("a forked process reached its parent's conductor")


def test_a_forked_process_never_tells_its_parents_conductor() -> None:
    tasks.conduct_here(cast(Any, _Conductor()), lambda: True)
    try:
        assert tasks._leader_here() is not None  # this process: the conductor leads here
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: as a prefork pool process forked after the ticker started
            os.close(read)
            os.write(write, b"none" if tasks._leader_here() is None else b"parent's")
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as answer:
            said = answer.read()
        os.waitpid(pid, 0)
        assert said == b"none"
    finally:
        tasks.conduct_here(None)
    assert tasks._leader_here() is None
