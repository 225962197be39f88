"""One chaos scenario end to end: services up, manifest in, faults on, wait, check, report.

:func:`run` starts a private PostgreSQL and Redis, the simulator (in this process), stores a
manifest of ``jobs`` text-to-video jobs (each with its own seed), starts supervised workers,
lets the scenario's ``chaos`` callable do its damage while the batch runs, waits until every
job is terminal, then checks the invariants (:mod:`chaos_invariants`) and writes the
figures to ``<tmp>/chaos-report.json``, to stdout, and — when ``WANBATCH_CHAOS_REPORT`` is set
— appends them to ``bench/RESULTS-chaos.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
import yaml

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs import batches, db
from jobs.settings import Settings
from tests.chaos import chaos_invariants as invariants
from tests.chaos.chaos_harness import REPO, PostgresServer, RedisServer, WorkerFleet

FAL_KEY = "chaos-key-0b1f2e"
REPORT_FILE = REPO / "bench" / "RESULTS-chaos.md"

#: Timing for CI on 2 cores: short leases so recovery is visible within seconds.
BASE_ENV = {
    "WANBATCH_LEASE_SECONDS": "3",
    "WANBATCH_SUBMIT_UNKNOWN_DEADLINE": "3",
    "WANBATCH_TICK_INTERVAL": "0.1",
    "WANBATCH_POLL_MIN_INTERVAL": "0.1",
    "WANBATCH_POLL_MAX_INTERVAL": "0.5",
    "WANBATCH_RETRY_BASE_DELAY": "0.1",
    "WANBATCH_RETRY_MAX_DELAY": "1",
    "WANBATCH_MAX_ATTEMPTS": "4",
    "WANBATCH_DOWNLOAD_ATTEMPTS": "6",
    "WANBATCH_SUBMIT_RATE": "100",
    "WANBATCH_SUBMIT_WAIT_MAX": "0.5",
    "WANBATCH_MAX_OUTSTANDING": "12",
    "WANBATCH_CONNECT_TIMEOUT": "2",
    "WANBATCH_READ_TIMEOUT": "5",
}


@dataclass
class Context:
    """What a scenario's chaos callable may act on."""

    postgres: PostgresServer
    redis: RedisServer
    sim: SimulatorHandle
    workers: WorkerFleet
    rng: random.Random
    done: threading.Event
    notes: list[str] = field(default_factory=list)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless the batch finished first; True when it did (stop doing damage)."""
        return self.done.wait(seconds)

    def wait_for_progress(self, fraction: float, timeout: float = 90.0) -> bool:
        """Wait until ``fraction`` of the jobs are terminal; False when the batch ended or time ran out.

        Damage is timed by progress rather than by the clock, so it lands mid-run on a fast
        machine and on a slow CI runner alike.
        """
        deadline = time.monotonic() + timeout
        while not self.done.wait(0.2):
            counts = _terminal_count(self.postgres.url)
            if counts and counts[1] and counts[0] >= fraction * counts[1]:
                self.notes.append(f"{counts[0]}/{counts[1]} terminal")
                return True
            if time.monotonic() > deadline:
                return False
        return False

    def broker_backlog(self) -> int:
        """Messages in Redis right now: queued plus delivered-but-unacknowledged."""
        client = redis.Redis(port=self.redis.port, socket_connect_timeout=1)
        try:
            return int(client.llen("wanbatch")) + int(client.hlen("unacked"))
        except redis.RedisError:
            return 0
        finally:
            client.close()


Chaos = Callable[[Context], None]


class ScenarioFigures(invariants.InvariantFigures):
    """The invariants' figures plus what the scenario did: faults fired, kills, restarts."""

    scenario: str
    faults_fired: dict[str, int]
    crash_point_exits: int
    other_worker_exits: dict[str, int]
    external_kills: int
    external_stops: int
    self_stops: int
    resumes: int
    worker_restarts: int
    redis_restarts: int
    postgres_crashes: int
    orphaned_late_answers: int
    notes: list[str]
    seconds: float


@dataclass(frozen=True)
class ScenarioFindings:
    """One scenario's figures and every invariant violation found (empty = all hold)."""

    figures: ScenarioFigures
    violations: list[str]
    #: The workers' last log lines, when something went wrong (else empty).
    worker_logs: str = ""


def write_manifest(folder: Path, name: str, jobs: int) -> Path:
    """``jobs`` text-to-video jobs at 480p, each with a distinct pinned seed."""
    path = folder / f"{name}.yaml"
    manifest = {
        "name": name,
        "endpoint": "fal-ai/wan-22",
        "defaults": {"resolution": "480p", "aspect_ratio": "16:9", "num_frames": 81},
        "items": [{"prompt": f"chaos scenario {name}, shot {i}", "seed": 10_000 + i} for i in range(jobs)],
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def _terminal_count(db_url: str) -> tuple[int, int] | None:
    """(terminal, total) jobs, or None while the database is unreachable."""
    try:
        with psycopg.connect(db_url, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE state IN ('succeeded','failed','cancelled')), count(*) "
                "FROM jobs"
            ).fetchone()
    except psycopg.Error:
        return None
    assert row is not None
    return int(row[0]), int(row[1])


def _worker_env(
    postgres: PostgresServer, redis: RedisServer, sim: SimulatorHandle, output: Path
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANBATCH_") and k != "FAL_KEY"}
    env.update(BASE_ENV)
    env.update(
        FAL_KEY=FAL_KEY,
        WANBATCH_DATABASE_URL=postgres.url,
        WANBATCH_BROKER_URL=redis.url,
        WANBATCH_FAL_QUEUE_URL=sim.url,
        WANBATCH_FAL_REST_URL=sim.url,
        WANBATCH_OUTPUT_DIR=str(output),
        PYTHONUNBUFFERED="1",
    )
    return env


def run(
    tmp_path: Path,
    name: str,
    *,
    jobs: int,
    chaos: Chaos | None = None,
    workers: int = 3,
    faults: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    per_worker_env: dict[int, dict[str, str]] | None = None,
    redis_appendonly: bool = False,
    resume_after: float = 5.0,
    timeout: float = 150.0,
    seed: int = 5,
) -> ScenarioFindings:
    """Run one scenario and return its findings (the caller asserts on them)."""
    started = time.monotonic()
    output = tmp_path / "outputs"
    postgres = PostgresServer()
    redis_server = RedisServer(tmp_path / "redis", appendonly=redis_appendonly)
    try:
        postgres.init()
        postgres.start()
        redis_server.start()
        sim_options = SimulatorOptions(
            latency_seconds=0.1,
            latency_jitter=0.5,
            concurrency_limit=40,
            rng_seed=seed,
            result_ttl_seconds=3600,
        )
        with running_simulator(sim_options) as sim:
            worker_env = {**_worker_env(postgres, redis_server, sim, output), **(env or {})}
            settings = Settings(database_url=postgres.url, output_dir=output)
            manifest = write_manifest(tmp_path, name, jobs)
            batches.submit_manifest(manifest, settings)
            db._engine_for(postgres.url).dispose()
            if faults:
                sim.set_faults(faults)
            fleet = WorkerFleet(workers, worker_env, tmp_path / "logs", resume_after=resume_after)
            fleet.extra_env.update(per_worker_env or {})
            done = threading.Event()
            ctx = Context(postgres, redis_server, sim, fleet, random.Random(seed), done)
            fleet.start()
            chaos_thread = None
            if chaos is not None:
                chaos_thread = threading.Thread(target=chaos, args=(ctx,), name="chaos", daemon=True)
                chaos_thread.start()
            deadline = time.monotonic() + timeout
            progress: tuple[int, int] | None = None
            try:
                while time.monotonic() < deadline:
                    progress = _terminal_count(postgres.url) or progress
                    if (
                        progress
                        and progress[0] == progress[1] == jobs
                        and (chaos_thread is None or not chaos_thread.is_alive())
                    ):
                        break
                    time.sleep(0.3)
                    if progress and progress[0] == progress[1] == jobs:
                        done.set()
                done.set()
                if chaos_thread is not None:
                    chaos_thread.join(60)
                fleet.settle_stops()  # frozen workers wake and try their late writes first
                _finish_reopened(fleet, postgres.url, jobs)
            finally:
                fleet.shutdown()
            # Orphaned requests (answers that never arrived) still run at fal: let them finish
            # so the ledger knows what each one was billed.
            with contextlib.suppress(TimeoutError):
                _settle(sim)
            ledger = sim.ledger()
            faults_fired = dict(sorted(ledger["faults"]["fired"].items()))
            checked = invariants.check(
                postgres.url,
                ledger,
                output,
                expected_jobs=jobs,
                max_outstanding=int(worker_env["WANBATCH_MAX_OUTSTANDING"]),
                policy=worker_env.get("WANBATCH_SUBMIT_UNKNOWN_POLICY", "fail"),
            )
            stats = fleet.stats
            figures: ScenarioFigures = {
                "scenario": name,
                **checked.figures,
                "faults_fired": faults_fired,
                "crash_point_exits": stats.exits.get(137, 0),
                "other_worker_exits": {str(k): v for k, v in stats.exits.items() if k not in (137, -9)},
                "external_kills": stats.external_kills,
                "external_stops": stats.external_stops,
                "self_stops": stats.self_stops,
                "resumes": stats.resumes,
                "worker_restarts": stats.restarts,
                "redis_restarts": redis_server.restarts,
                "postgres_crashes": postgres.crashes,
                "orphaned_late_answers": fleet.log_count("but the job moved on"),
                "notes": ctx.notes,
                "seconds": round(time.monotonic() - started, 1),
            }
            logs = fleet.log_tail(30) if checked.violations or figures["lost"] else ""
            findings = ScenarioFindings(figures, checked.violations, logs)
    finally:
        redis_server.kill()
        postgres.destroy()
    report(tmp_path, findings)
    return findings


def _finish_reopened(fleet: WorkerFleet, db_url: str, jobs: int, timeout: float = 30.0) -> None:
    """Let the fleet finish what the woken workers' late writes reopened.

    A late answer from fal adopted by a job that had failed for its unknown submit outcome
    moves it back to following and downloading (nothing is sent again). Killing the fleet
    then would leave that job mid-download: not a loss, but not the end state under test.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = _terminal_count(db_url)
        if counts and counts[0] == counts[1] == jobs:
            return
        fleet.settle_stops(grace=0.3)


def _settle(sim: SimulatorHandle, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while sim.ledger()["outstanding"] > 0:
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.1)


def _row(f: ScenarioFigures) -> str:
    faults = ", ".join(f"{k} {v}" for k, v in f["faults_fired"].items()) or "—"
    kills = f"{f['crash_point_exits']} crash-point, {f['external_kills']} SIGKILL"
    stops = f"{f['external_stops'] + f['self_stops']} SIGSTOP"
    services = f"redis×{f['redis_restarts']}, pg×{f['postgres_crashes']}"
    states = " ".join(f"{k}:{v}" for k, v in f["states"].items())
    return (
        f"| {f['scenario']} | {f['jobs']} | {states} | {f['lost']} | {faults} | {kills}; {stops} "
        f"| {services} "
        f"| {f['accepted_submits']} | {f['ambiguous_outcomes']} | {f['duplicate_paid_submissions']} "
        f"| {f['reported_possible_duplicates']} | {f['max_outstanding_at_fal']}/{f['outstanding_cap']} "
        f"| {f['seconds']} |"
    )


HEADER = (
    "| scenario | jobs | end states | lost | faults fired | worker kills | restarts | accepted submits "
    "| ambiguous | duplicate paid | reported dup. | max outstanding/cap | seconds |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def report(tmp_path: Path, findings: ScenarioFindings) -> None:
    """Figures to a file in the test's folder, to stdout, and optionally to bench/RESULTS-chaos.md."""
    figures = findings.figures
    (tmp_path / "chaos-report.json").write_text(
        json.dumps({"figures": figures, "violations": findings.violations}, indent=2, default=str)
    )
    print("\n" + HEADER + "\n" + _row(figures))
    if figures["notes"]:
        print("notes: " + "; ".join(figures["notes"]))
    if findings.violations:
        print("VIOLATIONS:\n  " + "\n  ".join(findings.violations[:50]))
    if os.environ.get("WANBATCH_CHAOS_REPORT"):
        fresh = not REPORT_FILE.exists()
        with REPORT_FILE.open("a", encoding="utf-8") as fh:
            if fresh:
                fh.write(
                    "# Chaos suite results\n\nAppended by `WANBATCH_CHAOS_REPORT=1 pytest tests/chaos`.\n"
                )
            stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
            fh.write(f"\n## {figures['scenario']} — {stamp}\n\n{HEADER}\n{_row(figures)}\n")
            if figures["notes"]:
                fh.write("\nNotes: " + "; ".join(figures["notes"]) + "\n")
            if findings.violations:
                fh.write("\nViolations:\n" + "".join(f"- {v}\n" for v in findings.violations[:50]))
