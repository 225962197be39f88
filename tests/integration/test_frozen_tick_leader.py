"""A frozen tick leader does not stall the distributed deployment.

``kill -STOP`` of the worker that leads the tick (Ctrl-Z on a foreground worker, a debugger, a
paused VM): its kernel still answers TCP keepalives, so its session — and the session-level
advisory lock that makes it the leader — lived on, and for as long as it stayed frozen nothing
was dispatched or collected, while the other worker idled. Now the other worker sees the
leader's heartbeat stand still (:class:`worker.ticker.LeaderWatch`), ends the lock's session on
the server and leads; the batch finishes. Thawed (``kill -CONT``) while jobs are still to be
sent, the old leader finds its lock session gone at its next check and steps down: fal's ledger
shows one accepted submit per job, none twice.

Two real ``wanbatch worker`` processes, a PostgreSQL database and a Redis database of this
test's own, the fal simulator in this process. No duration is asserted: conditions are polled
for under generous caps (the takeover itself needs the leader silent for about 35 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.distributed import (
    Scenario,
    environment,
    run_cli,
    start_workers,
    stop_processes,
    tail,
    write_manifest,
)
from falsim import SimulatorOptions, running_simulator
from jobs import db, store
from jobs.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

#: Generous caps: a condition polled for, never a duration asserted.
CAP_SECONDS = 240.0
#: A small cap and a model that takes a while: jobs are still to be sent when the old leader thaws.
SCENARIO = Scenario(jobs=24, workers=2, concurrency=2, cap=2, latency=1.0, sim_concurrency=4)


def _until(what: str, check: Callable[[], bool], logs: list[Path]) -> None:
    deadline = time.monotonic() + CAP_SECONDS
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n" + "\n---\n".join(tail(p, 40) for p in logs))
        time.sleep(0.2)


def _said(log: Path, event: str) -> bool:
    return event in log.read_text(errors="replace")


def _counts(url: str, batch_id: str) -> dict[str, int]:
    with db.read_scope(db.open_engine(Settings(database_url=url))) as session:
        return store.counts_by_state(session, batch_id)


def test_a_frozen_leader_is_taken_over_and_steps_down_on_waking(
    new_pg_database: Callable[[], str], redis_db: str, tmp_path: Path
) -> None:
    url = new_pg_database()
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    manifest = write_manifest(tmp_path, SCENARIO.jobs, name="frozen-leader")
    options = SimulatorOptions(
        concurrency_limit=SCENARIO.sim_concurrency, latency_seconds=SCENARIO.latency, latency_jitter=0.0
    )
    with running_simulator(options) as sim:
        env = environment(SCENARIO, url, redis_db, sim.url, tmp_path / "outputs")
        env["WANBATCH_LEASE_SECONDS"] = "10"  # the frozen worker's own task leases come back soon
        batch_id = str(run_cli(["submit", str(manifest), "--json"], env, tmp_path)["batch"])
        workers = start_workers(SCENARIO, env, tmp_path, logs_dir)
        logs = [logs_dir / f"worker-{n}.log" for n in range(len(workers))]
        frozen: int | None = None
        try:
            _until(
                "a worker to lead", lambda: any(_said(p, "now leads the periodic tick") for p in logs), logs
            )
            lead = next(n for n, p in enumerate(logs) if _said(p, "now leads the periodic tick"))
            other = 1 - lead
            _until("a job to succeed", lambda: _counts(url, batch_id).get("succeeded", 0) > 0, logs)
            frozen = workers[lead].pid
            os.killpg(frozen, signal.SIGSTOP)  # Ctrl-Z: the worker and its pool, all of it
            _until(
                "the other worker to take the lead over",
                lambda: _said(logs[other], "ended its lock session"),
                logs,
            )
            assert _counts(url, batch_id).get("succeeded", 0) < SCENARIO.jobs  # work left to fence
            os.killpg(frozen, signal.SIGCONT)
            frozen = None
            _until("the old leader to step down", lambda: _said(logs[lead], "stepping down"), logs)
            done = ("succeeded", "failed", "cancelled")
            _until(
                "every job to finish",
                lambda: sum(_counts(url, batch_id).get(s, 0) for s in done) == SCENARIO.jobs,
                logs,
            )
        finally:
            if frozen is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(frozen, signal.SIGCONT)
            stop_processes(workers)
        ledger = sim.ledger()
    assert _counts(url, batch_id).get("succeeded", 0) == SCENARIO.jobs, _counts(url, batch_id)
    assert ledger["accepted"] == SCENARIO.jobs  # one accepted submit per job
    assert ledger["duplicates"] == []
    lead_pid = workers[lead].pid
    taken = [
        line for line in logs[other].read_text(errors="replace").splitlines() if "ended its lock" in line
    ]
    assert len(taken) == 1, taken  # one takeover, naming the frozen leader
    assert f":{lead_pid} (database backend pid " in taken[0]
    assert "Traceback" not in logs[lead].read_text(errors="replace")
