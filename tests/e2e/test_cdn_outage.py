"""The audit, end to end against the simulator: fal's CDN answers 503 to every download.

Before, each paid job failed ``download_failed`` after ``WANBATCH_DOWNLOAD_ATTEMPTS`` tries
(about 75 s), and ``rerun --failed-only`` rendered and billed them all again. Now the jobs wait
in ``downloading``, the batch pauses naming the host and the status (``run`` exits 2), and the
next ``run`` once the CDN serves again downloads the very videos fal made: billed once.
"""

from __future__ import annotations

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl
from worker.steps import download_reach

THREE_JOBS = """\
name: dl1
endpoint: fal-ai/wan-22
items:
  - {prompt: A paper boat drifting down a rainy street, resolution: 480p, seed: 1}
  - {prompt: A lantern over a quiet harbour, resolution: 480p, seed: 2}
  - {prompt: Snow on a red bicycle, resolution: 480p, seed: 3}
"""


def test_a_cdn_outage_pauses_the_batch_and_the_paid_videos_are_fetched_never_paid_twice(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download_reach, "PAUSE_AFTER_SECONDS", 1.0)  # a minute, short for a test
    sim.set_faults(download_error={"probability": 1.0, "status": 503})
    path = manifest("dl1", THREE_JOBS)

    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 2, run.stdout + run.stderr
    said = run.stdout + run.stderr
    assert "HTTP 503" in said
    assert "127.0.0.1" in said
    assert "never made again" in said
    records = export_jsonl(wb, "dl1")
    assert [r["status"] for r in records] == ["downloading"] * 3, records
    assert all(r["error"] is None for r in records)

    nothing = wb("rerun", "dl1", "--failed-only")  # nothing failed: nothing rendered again
    assert nothing.code == 0, nothing.stderr
    assert "nothing to rerun" in nothing.stdout + nothing.stderr

    sim.engine.faults.clear()  # the CDN serves again
    again = wb("run", path, "--json", "--no-progress")
    assert again.code == 0, again.stdout + again.stderr
    assert again.json()["counts"]["succeeded"] == 3
    assert again.json()["wasted_usd"] == 0
    ledger = sim.ledger()
    assert ledger["accepted"] == 3  # nothing rendered again
    assert ledger["billed_count"] == 3  # paid once
