"""``kill -9`` between saving a video and recording the job's success, then ``run`` again.

The first ``run`` dies at the ``after_download`` crash point (the video fsynced and renamed to
its final name, the job still ``downloading``); by the time the batch is run again fal no
longer serves the file. The video in the output folder is the paid output: the job takes it,
never downloads (nor renders, nor pays for) it again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, db_rows, wanbatch
from tests.in_process import run_main
from worker.chaos import CRASH_EXIT_CODE

ONE_JOB = """\
name: afterdl
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat drifting down a rainy street
    resolution: 480p
    seed: 7
"""


@pytest.mark.parametrize("status", [404, 503], ids=["expired", "persistent-5xx"])
def test_a_video_saved_before_a_crash_is_taken_on_resume_not_fetched_again(
    sim: SimulatorHandle,
    manifest: MakeManifest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
) -> None:
    monkeypatch.setenv("WANBATCH_LEASE_SECONDS", "1")  # the dead run's lease lapses at once
    path = manifest("afterdl", ONE_JOB)
    crashed = wanbatch("run", path, "--no-progress", env={"WANBATCH_CHAOS_CRASH_POINTS": "after_download:1"})
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr

    folder = tmp_path / "outputs" / "afterdl"
    (video,) = folder.glob("*.mp4")
    assert not list(folder.glob("*.json"))  # killed before the sidecar
    saved = hashlib.sha256(video.read_bytes()).hexdigest()
    url = os.environ["WANBATCH_DATABASE_URL"]
    assert [tuple(r) for r in db_rows(url, "select state from jobs")] == [("downloading",)]
    (entry,) = sim.ledger()["entries"]
    assert entry["output_sha256"] == saved  # the complete paid video

    sim.set_faults(download_error={"probability": 1.0, "status": status})  # fal no longer serves it
    get_settings.cache_clear()
    assert run_main(["run", "afterdl", "--no-progress"], monkeypatch) == 0

    ((state, sha256, output_path, error),) = db_rows(
        url, "select state, output_sha256, output_path, error from jobs"
    )
    assert (state, error) == ("succeeded", None)
    assert sha256 == saved
    assert Path(output_path) == video
    assert hashlib.sha256(video.read_bytes()).hexdigest() == saved
    assert video.with_suffix(".json").exists()
    ledger = sim.ledger()
    assert ledger["faults"]["fired"].get("download_error", 0) == 0  # no second download request
    assert ledger["accepted"] == 1  # nothing rendered again
    assert ledger["billed_count"] == 1  # paid once
