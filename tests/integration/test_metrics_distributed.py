"""A real ``wanbatch worker`` (Celery prefork pool, Redis, PostgreSQL) with
``WANBATCH_LOG_FORMAT=json``, ``WANBATCH_METRICS_PORT`` and Celery events:

* every line the worker writes is one JSON object with an ``event``; the step lines name their
  job, batch and fal request; the key is nowhere;
* its metrics port sums what the pool's child processes counted (each submit is counted in the
  child that sent it), equal to the simulator's accepted submits;
* Celery task events reach a receiver on the broker, as Flower's would;
* ``/metrics`` of ``serve`` (the database) agrees with the worker's own count.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from starlette.applications import Starlette
from starlette.testclient import TestClient

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
from jobs.settings import Settings
from tests.celery_events import EventTap
from tests.ports import unused_port
from web.metrics import metrics_route

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

KEY = "b-worker-key-6a2f8c0e:9d4b1e7a3c5f"
SUBMIT_TASK = "wanbatch.submit_job"


def _every_submit_seen(tap: EventTap, jobs: int) -> bool:
    """Whether the receiver has heard what the test asserts of the events: ``jobs`` submits
    received and succeeded, and a submit's ``task-sent``."""
    events = list(tap.events)
    received = {e["uuid"] for e in events if e["type"] == "task-received" and e.get("name") == SUBMIT_TASK}
    succeeded = {e["uuid"] for e in events if e["type"] == "task-succeeded"}
    sent = any(e["type"] == "task-sent" and e.get("name") == SUBMIT_TASK for e in events)
    return len(received) >= jobs and received <= succeeded and sent


def test_a_worker_logs_json_serves_summed_metrics_and_sends_celery_events(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    scenario = Scenario(
        jobs=12, workers=1, concurrency=3, pool="prefork", cap=6, latency=0.2, sim_concurrency=6
    )  # prefork: the port sums its children
    manifest = write_manifest(tmp_path, scenario.jobs, name="observed")
    logs = tmp_path / "logs"
    logs.mkdir()
    port = unused_port()
    options = SimulatorOptions(concurrency_limit=scenario.sim_concurrency, latency_seconds=scenario.latency)
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker, running_simulator(options) as sim:
        database = new_pg_database()
        env = environment(scenario, database, broker, sim.url, tmp_path / "outputs")
        env.update(FAL_KEY=KEY, WANBATCH_LOG_FORMAT="json", WANBATCH_METRICS_PORT=str(port))
        tap = EventTap(broker)
        tap.wait_listening()  # the receiver's subscription is in place before the worker starts
        workers = start_workers(scenario, env, tmp_path, logs)
        try:
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
            engine = create_engine(database)
            deadline = time.monotonic() + 180
            finished = 0
            while time.monotonic() < deadline:
                with engine.connect() as conn:
                    finished = conn.execute(
                        text(
                            "SELECT count(*) FROM jobs WHERE batch_id = :b "
                            "AND state IN ('succeeded', 'failed', 'cancelled')"
                        ),
                        {"b": batch},
                    ).scalar_one()
                if finished == scenario.jobs:
                    break
                time.sleep(0.3)
            assert finished == scenario.jobs, tail(logs / "worker-0.log")
            served = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            deadline = time.monotonic() + 15  # the last task events are on their way (0.5 s bunches)
            while not _every_submit_seen(tap, scenario.jobs) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            tap.stop()
            codes = stop_processes(workers)
        ledger = sim.ledger()
        page = TestClient(Starlette(routes=[metrics_route(engine, Settings())])).get("/metrics").text
        engine.dispose()
    log_text = (logs / "worker-0.log").read_text(encoding="utf-8")
    assert codes == [0], tail(logs / "worker-0.log")

    # Logs: every line is a JSON object with an event; the step lines name job, batch, request.
    records = []
    for line in log_text.splitlines():
        record = json.loads(line)  # a line that is not JSON fails here, with the line shown
        assert isinstance(record, dict), line
        assert isinstance(record.get("event"), str), line
        assert record["event"], line
        records.append(record)
    events = Counter(record["event"] for record in records)
    submits = [r for r in records if r["event"] == "job.submit"]
    assert len(submits) >= scenario.jobs, events
    accepted_lines = [r for r in submits if r.get("outcome") == "submitted"]
    assert len(accepted_lines) == scenario.jobs
    for record in accepted_lines:
        assert record["job_id"]
        assert record["batch_id"] == batch
        assert record["request_id"]
    downloads = [r for r in records if r["event"] == "job.download" and r.get("outcome") == "succeeded"]
    assert len(downloads) == scenario.jobs
    assert all(r["batch_id"] == batch and r["request_id"] for r in downloads)
    assert KEY not in log_text
    assert KEY.split(":")[1] not in log_text

    # Metrics: the port sums the pool's children; it agrees with the ledger and the database.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(served)
        for s in family.samples
    }
    submitted_by_children = sum(
        v
        for (name, labels), v in samples.items()
        if name == "wanbatch_worker_submits_total" and ("outcome", "accepted") in labels
    )
    assert submitted_by_children == ledger["accepted"] == scenario.jobs
    assert KEY not in served
    db_samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }
    assert db_samples[("wanbatch_jobs", (("state", "succeeded"),))] == scenario.jobs
    assert db_samples[("wanbatch_submits_total", ())] == scenario.jobs

    # Celery events: what Flower shows, sent by the worker (received/started/succeeded) and by
    # whoever queued the task (sent).
    kinds = Counter(e["type"] for e in tap.events)
    submit_uuids = {
        e["uuid"] for e in tap.events if e["type"] == "task-received" and e.get("name") == SUBMIT_TASK
    }
    assert len(submit_uuids) >= scenario.jobs, kinds
    succeeded = {e["uuid"] for e in tap.events if e["type"] == "task-succeeded"}
    assert submit_uuids <= succeeded
    assert any(e["type"] == "task-sent" and e.get("name") == SUBMIT_TASK for e in tap.events), kinds
    assert kinds["worker-heartbeat"] + kinds["worker-online"] >= 1, kinds
