"""`kill -9` of a `wanbatch run` (or its SSH session closed under it): `status` says at once
that nothing processes the batch.

The bug (audit of the operator's view): for a minute after the kill (the heartbeat's staleness,
``jobs.listing.PROCESSING_STALE_SECONDS``) `status`, the dashboard and /metrics still said the
batch was being processed, and the headline blamed fal's queue (the queue-wait back-off, counted
from the dead run's own requests) while nothing worked on it. A heartbeat is the process's
``host:pid:…``: one of a process of this host that has ended tells when the batch was last seen,
never that it is processed (:func:`jobs.processes.owner_gone`).

`wanbatch run` is a real subprocess (SIGKILL needs one) against a simulator in this test process
whose renders take ten minutes, so its requests stay at fal: one running, the others queued.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from tests.e2e.e2e_helpers import (
    Background,
    MakeManifest,
    db_rows,
    subprocess_env,
    wait_for,
    wanbatch_command,
)

JOBS = 6
#: How the queue-wait back-off's note names it.
QUEUE_NOTE = "have waited in fal's queue"
MANIFEST = "name: killed\nendpoint: fal-ai/wan-22\nitems:\n" + "".join(
    f"  - prompt: killed run item {i}\n" for i in range(JOBS)
)


@pytest.fixture
def sim() -> Iterator[SimulatorHandle]:
    """A simulator that runs one request at a time, for ten minutes: the rest wait in its queue."""
    with running_simulator(
        SimulatorOptions(latency_seconds=600.0, latency_jitter=0.0, concurrency_limit=1, rng_seed=11)
    ) as handle:
        yield handle


@pytest.fixture
def env(e2e_env: Path, sim: SimulatorHandle) -> dict[str, str]:
    # Three requests at fal (its own: the cap is at work for it, not named); the queue-wait
    # back-off holds the other three back once fal's queue has kept two waiting over a second.
    return subprocess_env(sim.url, MAX_OUTSTANDING="3", QUEUE_WAIT_BACKOFF="1", EMBEDDED_CONCURRENCY="3")


def _status(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``wanbatch status ARGS`` from another process, as a user would ask."""
    return subprocess.run(
        [*wanbatch_command(), "status", *args],
        env={**env, "COLUMNS": "300"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _report(env: dict[str, str], cwd: Path) -> dict[str, Any]:
    done = _status(env, cwd, "killed", "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_status_says_at_once_that_nothing_processes_a_batch_whose_run_was_killed(
    manifest: MakeManifest, env: dict[str, str], e2e_env: Path
) -> None:
    db = env["WANBATCH_DATABASE_URL"]
    run = Background(["run", str(manifest("killed", MANIFEST)), "--no-progress"], env, e2e_env, "run")
    try:
        # While it runs: processed, and what holds its unsent jobs back is fal's queue.
        def held_by_fals_queue() -> bool:
            try:
                report = _report(env, e2e_env)
            except (AssertionError, json.JSONDecodeError):  # not created yet
                return False
            return bool(report["processing"]) and QUEUE_NOTE in str(report["phase_reason"])

        wait_for("the queue-wait back-off to hold the batch back", held_by_fals_queue, run, step=0.2)
        run.popen.send_signal(signal.SIGKILL)
        run.popen.wait(10)
    finally:
        run.kill()
    # It died with its heartbeat (and its requests at fal) left behind.
    assert int(db_rows(db, "SELECT count(*) FROM conductor_heartbeats")[0][0]) == 1

    report = _report(env, e2e_env)
    assert (report["processing"], report["eta_seconds"]) == (False, None)
    assert report["phase"] == "active"
    assert report["phase_reason"] is None  # no cap or queue is blamed: nothing sends the batch
    assert report["processed_at"] is not None  # when it was last seen
    assert report["in_flight"] >= 3

    text = _status(env, e2e_env, "killed")
    assert text.returncode == 0, text.stderr  # CONTRACT: nothing failed or was cancelled
    out = text.stdout
    assert "nothing is processing it (last seen" in out, out
    assert "`wanbatch run killed`" in out, out  # what goes on with it
    assert QUEUE_NOTE not in out, out
    assert "left" not in out, out  # no ETA

    every = _status(env, e2e_env)  # all batches: the same words, the same report
    assert every.returncode == 0, every.stderr
    assert "nothing is processing it (last seen" in every.stdout, every.stdout
    assert QUEUE_NOTE not in every.stdout, every.stdout
    listed = _status(env, e2e_env, "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)["batches"]
    assert (row["processing"], row["eta_seconds"], row["phase_reason"]) == (False, None, None)
