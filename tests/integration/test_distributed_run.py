"""`wanbatch run` with a broker configured submits, then waits for the workers to finish.

The contract: "embedded when no broker is configured; with a broker it waits on the workers".
One real `wanbatch worker` on the shared Redis (a DB number of its own) and a fresh PostgreSQL
database; `run` itself must start no worker of its own and still report the finished batch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
from falsim.ledger import LedgerReport

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

#: The unpaused batch that shows the workers dispatching while another batch is paused.
WITNESS_JOBS = 2


def _run_through_a_worker(
    database_url: str,
    redis_url: str,
    tmp_path: Path,
    name: str,
    *,
    settings: dict[str, str] | None = None,
    faults: dict[str, Any] | None = None,
    wanbatch: list[str] | None = None,
) -> tuple[Scenario, dict[str, Any], LedgerReport, list[int | None]]:
    """``wanbatch run NAME --json`` with a broker, one real ``wanbatch worker`` doing the work;
    (the scenario, run's report, the simulator's ledger, the worker's exit codes). ``wanbatch``:
    the command that runs ``run`` (default: :func:`wanbatch_command`)."""
    scenario = Scenario(jobs=10, workers=1, concurrency=2, cap=4, latency=0.1, sim_concurrency=4)
    manifest = write_manifest(tmp_path, scenario.jobs, name=name)
    logs = tmp_path / "logs"
    logs.mkdir()
    options = SimulatorOptions(concurrency_limit=scenario.sim_concurrency, latency_seconds=scenario.latency)
    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker, running_simulator(options) as sim:
        env = environment(scenario, database_url, broker, sim.url, tmp_path / "outputs") | (settings or {})
        if faults:
            sim.set_faults(faults)
        workers = start_workers(scenario, env, tmp_path, logs)
        try:
            run = subprocess.run(
                [*(wanbatch or wanbatch_command()), "run", str(manifest), "--json"],
                env=env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert run.returncode == 0, run.stdout + run.stderr + tail(logs / "worker-0.log")
        finally:
            codes = stop_processes(workers)
        return scenario, json.loads(run.stdout), sim.ledger(), codes


#: ``wanbatch`` that writes the modules it loaded to the file named by ``MODULES_OUT`` as it exits.
_RECORDING_MODULES = """
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["MODULES_OUT"], "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["wanbatch", *sys.argv[1:]]
from cli import main
main()
"""


def test_run_with_a_broker_watches_without_loading_the_workers_steps(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    """With a broker, ``run`` only submits and watches: the steps, the fal client and PyAV are the
    workers' (about a third of the CPU an embedded ``run`` spends importing), so the watcher never
    loads them. (Pillow it may: the manifest's images are checked before anything is stored.)"""
    out = tmp_path / "modules.json"
    _, report, _, _ = _run_through_a_worker(
        new_pg_database(),
        redis_url,
        tmp_path,
        "run-watch-light",
        settings={"MODULES_OUT": str(out)},
        wanbatch=[sys.executable, "-c", _RECORDING_MODULES],
    )
    assert report["counts"]["succeeded"] == report["total"]
    loaded = set(json.loads(out.read_text()))
    assert "worker.running" in loaded  # it did watch
    workers_own = (
        "worker.steps",
        "worker.tasks",
        "worker.fal.client",
        "worker.fal.storage",
        "worker.probe",
        "av",
    )
    machinery = sorted(m for m in loaded if m.startswith(workers_own))
    assert machinery == []


def test_run_with_a_broker_waits_for_the_workers(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    scenario, report, ledger, codes = _run_through_a_worker(
        new_pg_database(), redis_url, tmp_path, "run-with-broker"
    )
    assert report["counts"]["succeeded"] == scenario.jobs == report["total"]
    assert report["finished"] == scenario.jobs
    assert ledger["accepted"] == scenario.jobs
    assert ledger["duplicates"] == []
    assert codes == [0]
    assert len(list((tmp_path / "outputs" / "run-with-broker").glob("*.mp4"))) == scenario.jobs


def test_pause_stops_every_worker_and_resume_finishes_the_batch(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    """Issue #12: `pause` holds new submits back in every worker at once; `resume` goes on."""
    import time

    scenario = Scenario(jobs=24, workers=2, concurrency=2, cap=4, latency=0.3, sim_concurrency=4)
    manifest = write_manifest(tmp_path, scenario.jobs, name="pause-resume")
    logs = tmp_path / "logs"
    logs.mkdir()
    options = SimulatorOptions(concurrency_limit=scenario.sim_concurrency, latency_seconds=scenario.latency)

    def cli(*args: str) -> dict[str, object]:
        done = subprocess.run(
            [*wanbatch_command(), *args, "--json"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        out: dict[str, object] = json.loads(done.stdout)
        return out

    # A witness: a batch submitted after the paused one, and not paused. Once it is finished the
    # workers are up and the leader has dispatched, round after round, past the paused batch's
    # older jobs (not a fixed sleep, which a loaded machine could outlast before the first round).
    (tmp_path / "witness").mkdir()
    witness_manifest = write_manifest(tmp_path / "witness", WITNESS_JOBS, name="pause-witness")
    text = witness_manifest.read_text(encoding="utf-8")  # its own prompts: no input sent twice
    witness_manifest.write_text(text.replace("Shot ", "Witness shot "), encoding="utf-8")

    def finished(batch: str) -> dict[str, object]:
        deadline = time.monotonic() + 120
        while (report := cli("status", batch))["finished"] != report["total"]:
            assert time.monotonic() < deadline, (
                f"{batch} not finished: {report}\n{tail(logs / 'worker-0.log')}"
            )
            time.sleep(0.3)
        return report

    with claimed_redis_db(redis_url.rsplit("/", 1)[0]) as broker, running_simulator(options) as sim:
        env = environment(scenario, new_pg_database(), broker, sim.url, tmp_path / "outputs")
        batch = str(cli("submit", str(manifest))["batch"])
        cli("pause", batch)
        witness = str(cli("submit", str(witness_manifest))["batch"])
        workers = start_workers(scenario, env, tmp_path, logs)
        try:
            finished(witness)
            assert sim.ledger()["accepted"] == WITNESS_JOBS, tail(logs / "worker-0.log")  # none paused
            held = cli("status", batch)["counts"]
            assert isinstance(held, dict)
            assert {state: n for state, n in held.items() if n} == {"pending": scenario.jobs}
            cli("resume", batch)
            report = finished(batch)
        finally:
            stop_processes(workers)
        ledger = sim.ledger()
    counts = report["counts"]
    assert isinstance(counts, dict)
    assert counts["succeeded"] == scenario.jobs, counts
    assert ledger["accepted"] == scenario.jobs + WITNESS_JOBS
    assert ledger["duplicates"] == []


def test_a_429_storm_through_the_workers_loses_no_job(
    new_pg_database: Callable[[], str], redis_url: str, tmp_path: Path
) -> None:
    """The workers share the pause a 429 asks for (the Redis limiter's ``hold_off``) and give the
    refused jobs back uncounted: with one attempt per job, a storm of refusals fails none."""
    scenario, report, ledger, _codes = _run_through_a_worker(
        new_pg_database(),
        redis_url,
        tmp_path,
        "storm-through-workers",
        settings={"WANBATCH_MAX_ATTEMPTS": "1", "WANBATCH_RETRY_BASE_DELAY": "0.2"},
        faults={"submit_429": {"next": 6}},
    )
    assert report["counts"]["succeeded"] == scenario.jobs == report["total"]
    assert sum(1 for r in ledger["rejections"] if r["status_code"] == 429) == 6
    assert report["rate_limited_submits"] == 6
    assert ledger["accepted"] == scenario.jobs
