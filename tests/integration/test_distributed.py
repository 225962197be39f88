"""Issue #4: a 200-job batch over all five endpoints, processed by two real ``wanbatch worker``s.

Real PostgreSQL (a fresh database), real Redis as the Celery broker (a DB number of its own),
real worker processes (Celery prefork, 2 each) started from the console script, and the fal
simulator, whose ledger is the outside witness: what fal accepted, how often, and how many
requests it ever held at once. The scenario itself lives in ``bench/distributed.py`` (the
benchmark runs the same thing and prints figures); this test asserts the invariants:

* every job succeeded, and fal accepted exactly one submit per job — no duplicate;
* the outstanding cap (6) held at fal, across both workers;
* every output file is on disk, and its real sha256 equals the database's, the export's and
  the simulator's record of what it served; pinned seeds came back as pinned;
* both workers did work.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.distributed import (
    Outcome,
    Scenario,
    claimed_redis_db,
    run_scenario,
    wanbatch_command,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

SCENARIO = Scenario(jobs=200, workers=2, concurrency=2, cap=6, latency=0.2, sim_concurrency=8)


@pytest.fixture(scope="module")
def outcome(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Outcome:
    """One run of the scenario, shared by the assertions below (it is the expensive part)."""
    workdir = tmp_path_factory.mktemp("distributed")
    database_url = new_pg_database()
    base = redis_url.rsplit("/", 1)[0]
    started = time.monotonic()
    with claimed_redis_db(base) as broker_url:
        result = run_scenario(SCENARIO, workdir, database_url, broker_url)
    print(
        f"\ndistributed run: {time.monotonic() - started:.1f}s in all, {result.wall_seconds:.1f}s from "
        f"worker start, {result.status_calls} status calls, logs in {workdir / 'logs'}"
    )
    return result


def _export(o: Outcome) -> list[dict[str, object]]:
    """``wanbatch export BATCH --format jsonl`` as records (the contract's dataset view)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_")}
    env.update(WANBATCH_DATABASE_URL=o.database_url, WANBATCH_OUTPUT_DIR=str(o.output_dir))
    proc = subprocess.run(
        [*wanbatch_command(), "export", o.batch_id, "--format", "jsonl"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_every_job_succeeds_with_exactly_one_accepted_submit(outcome: Outcome) -> None:
    assert outcome.report["total"] == SCENARIO.jobs
    assert outcome.report["counts"]["succeeded"] == SCENARIO.jobs, outcome.report["counts"]
    assert outcome.report["possible_duplicate_charges"] == 0
    ledger = outcome.ledger
    assert ledger["accepted"] == SCENARIO.jobs
    assert ledger["duplicates"] == []
    assert ledger["rejections"] == []
    assert ledger["completed"] == SCENARIO.jobs
    assert outcome.requests["submit"] == SCENARIO.jobs  # not even a refused POST was resent


def test_the_outstanding_cap_holds_across_workers(outcome: Outcome) -> None:
    assert 2 <= outcome.ledger["max_outstanding"] <= SCENARIO.cap


def test_outputs_match_database_export_and_simulator(outcome: Outcome) -> None:
    from jobs import db
    from jobs.db import open_engine
    from jobs.models import Job
    from jobs.settings import Settings

    served = {e["request_id"]: e for e in outcome.ledger["entries"]}
    engine = open_engine(Settings(database_url=outcome.database_url))
    with db.session_scope(engine) as session:
        jobs = {
            j.id: (j.request_id, j.output_path, j.output_sha256, j.seed)
            for j in session.scalars(select(Job).where(Job.batch_id == outcome.batch_id))
        }
    records = _export(outcome)
    assert len(records) == len(jobs) == SCENARIO.jobs
    assert len({r for r, *_ in jobs.values()}) == SCENARIO.jobs  # one request per job
    for rec in records:
        request_id, output_path, db_sha, db_seed = jobs[str(rec["job_id"])]
        assert rec["status"] == "succeeded"
        assert rec["request_id"] == request_id
        video = Path(str(rec["video_path"]))
        if not video.is_absolute():
            video = outcome.output_dir / video
        assert video.is_file(), video
        assert output_path is not None
        assert request_id is not None
        assert Path(output_path).resolve() == video.resolve()
        real = hashlib.sha256(video.read_bytes()).hexdigest()
        assert real == db_sha == rec["video_sha256"] == served[request_id]["output_sha256"]
        assert rec["seed"] == db_seed == served[request_id]["seed"]
        index = int(str(rec["item_index"]))
        if index % 3 == 0:  # the manifest pins these seeds (bench.distributed.write_manifest)
            assert rec["seed"] == 1000 + index
    assert len({r["video_sha256"] for r in records}) == SCENARIO.jobs


def test_both_workers_did_work(outcome: Outcome) -> None:
    """The tick (dispatch, polls) runs on one leader; submits and downloads are Celery tasks, spread."""
    per_worker = outcome.work_by_worker()
    print(f"\njob events per worker: { {i: dict(c) for i, c in per_worker.items()} }")
    assert set(per_worker) == set(range(SCENARIO.workers))
    for counts in per_worker.values():
        assert counts["queued"] + counts["succeeded"] > 0  # a submit or a download task ran here
    assert outcome.worker_exit_codes == [0] * SCENARIO.workers  # warm shutdown on SIGTERM
