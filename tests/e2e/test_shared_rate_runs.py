"""Two `wanbatch run` side by side on one database send at ``WANBATCH_SUBMIT_RATE`` together,
not each (the contract: "global cap on submits per second, all workers and hosts together")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest

RATE = 5
JOBS = 15  # per run


def _manifest(manifest: MakeManifest, name: str) -> Path:
    items = "".join(f"  - prompt: {name} {i}\n" for i in range(JOBS))
    return manifest(name, f"name: {name}\nendpoint: fal-ai/wan-22\nitems:\n{items}")


def test_two_runs_on_one_database_share_the_submit_rate(sim: SimulatorHandle, manifest: MakeManifest) -> None:
    env = {**os.environ, "WANBATCH_SUBMIT_RATE": str(RATE)}
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import cli; cli.main()",
                "run",
                str(_manifest(manifest, name)),
                "--no-progress",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("left", "right")
    ]
    for run in runs:
        _, err = run.communicate(timeout=180)
        assert run.returncode == 0, err

    accepted = sorted(e["accepted_at"] for e in sim.ledger()["entries"])
    assert len(accepted) == 2 * JOBS
    # A token bucket of RATE a second, holding at most RATE: however the two runs interleave,
    # 2 × JOBS submits need at least (2 × JOBS − RATE) / RATE seconds. Each run pacing itself
    # alone did it in about half that (two buckets, twice the rate).
    least = (2 * JOBS - RATE) / RATE
    assert accepted[-1] - accepted[0] >= least * 0.95, accepted
