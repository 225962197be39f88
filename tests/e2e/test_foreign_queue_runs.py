"""Two `wanbatch run` on one database, each with its own fal queue URL and key, follow only their
own requests: neither asks its fal about the other's (which answers 404), so no paid job of
either ends "provider lost the request", nothing is sent twice, and each fal's cap holds.

Before, every process polled every batch's requests at its own queue URL: a run against
another simulator failed a slow run's paid jobs as lost, and that run refilled the freed slots
past its outstanding cap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from tests.e2e.e2e_helpers import FAST_ENV, MakeManifest

SLOW_JOBS = 12
FAST_JOBS = 8
CAP = 4
KEY_SLOW = "test-key-slow-queue-7c1e"
KEY_FAST = "test-key-fast-queue-93ab"


def _manifest(manifest: MakeManifest, name: str, jobs: int) -> Path:
    items = "".join(f"  - prompt: {name} {i}\n" for i in range(jobs))
    return manifest(name, f"name: {name}\nendpoint: fal-ai/wan-22\nitems:\n{items}")


def _run(path: Path, sim: SimulatorHandle, key: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **FAST_ENV,
        "FAL_KEY": key,
        "WANBATCH_FAL_QUEUE_URL": sim.url,
        "WANBATCH_FAL_REST_URL": sim.url,
        "WANBATCH_MAX_OUTSTANDING": str(CAP),
    }
    return subprocess.Popen(
        [sys.executable, "-c", "import cli; cli.main()", "run", str(path), "--no-progress", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _options(latency: float, key: str) -> SimulatorOptions:
    return SimulatorOptions(
        latency_seconds=latency, latency_jitter=0.0, concurrency_limit=40, rng_seed=7, accepted_keys=(key,)
    )


def test_runs_on_other_queues_leave_each_others_requests_alone(manifest: MakeManifest) -> None:
    slow_manifest = _manifest(manifest, "slow-queue", SLOW_JOBS)
    fast_manifest = _manifest(manifest, "fast-queue", FAST_JOBS)
    with (
        running_simulator(_options(4.0, KEY_SLOW)) as slow,
        running_simulator(_options(2.0, KEY_FAST)) as fast,
    ):
        slow_run = _run(slow_manifest, slow, KEY_SLOW)
        try:
            deadline = time.monotonic() + 60
            while slow.ledger()["accepted"] < CAP:  # its first requests are at its fal
                assert slow_run.poll() is None, slow_run.communicate()
                assert time.monotonic() < deadline, "the slow run sent nothing"
                time.sleep(0.05)
            fast_run = _run(fast_manifest, fast, KEY_FAST)
            fast_out, fast_err = fast_run.communicate(timeout=120)
            slow_out, slow_err = slow_run.communicate(timeout=180)
        finally:
            if slow_run.poll() is None:
                slow_run.kill()
                slow_run.communicate()
        assert fast_run.returncode == 0, fast_err
        assert slow_run.returncode == 0, slow_err
        for out, jobs in ((fast_out, FAST_JOBS), (slow_out, SLOW_JOBS)):
            counts = {state: n for state, n in json.loads(out)["counts"].items() if n}
            assert counts == {"succeeded": jobs}
        assert "lost the request" not in slow_err + fast_err
        for sim, jobs in ((slow, SLOW_JOBS), (fast, FAST_JOBS)):
            ledger = sim.ledger()
            assert ledger["accepted"] == jobs  # each job sent once, to its own fal
            assert ledger["billed_count"] == jobs
            assert ledger["duplicates"] == []
            assert ledger["max_outstanding"] <= CAP
