"""``reuse_outputs: true`` end to end on the simulator: pinned-seed twins of succeeded jobs are
never sent again, and take the very same file; unseeded jobs always are sent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

#: Two pinned-seed jobs and one fal seeds itself (its key is the same in every batch).
BODY = """\
name: {name}
endpoint: fal-ai/wan-i2v
reuse_outputs: {reuse}
defaults:
  resolution: 480p
  num_frames: 81
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 7
  - prompt: Night falls over the hills
    image_url: images/night.jpg
    seed: 8
  - prompt: A lantern in the fog
    image_url: images/landscape.jpg
"""


def _run(wb: Wb, manifest: MakeManifest, name: str, reuse: bool) -> str:
    path = manifest(name, BODY.format(name=name, reuse="true" if reuse else "false"))
    done = wb("run", path, "--json", "--no-progress")
    assert done.code == 0, done.stderr
    report = done.json()
    assert report["counts"]["succeeded"] == 3, report
    return str(report["batch"])


@pytest.mark.slow
def test_pinned_seed_twins_reuse_outputs_and_unseeded_jobs_are_sent(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    first = _run(wb, manifest, "first", reuse=False)
    assert sim.ledger()["accepted"] == 3
    again = _run(wb, manifest, "again", reuse=True)
    assert sim.ledger()["accepted"] == 4  # only the unseeded job was sent again

    a = {r["input"]["prompt"]: r for r in export_jsonl(wb, first)}
    b = {r["input"]["prompt"]: r for r in export_jsonl(wb, again)}
    assert a.keys() == b.keys()
    for prompt in ("Clouds drifting past the peak", "Night falls over the hills"):
        original, reused = a[prompt], b[prompt]
        assert reused["reused_from"] == original["job_id"]
        assert original["reused_from"] is None
        assert reused["status"] == "succeeded"
        assert reused["cost_usd"] == 0
        assert reused["request_id"] is None  # never sent
        assert reused["attempts"] == 0
        assert reused["seed"] == original["seed"]
        assert reused["video_sha256"] == original["video_sha256"] is not None
        assert reused["video_path"] == original["video_path"]
        video = tmp_path / "outputs" / str(reused["video_path"])
        assert hashlib.sha256(video.read_bytes()).hexdigest() == reused["video_sha256"]
    unseeded = b["A lantern in the fog"]
    assert unseeded["reused_from"] is None
    assert unseeded["request_id"] is not None
    assert unseeded["cost_usd"] > 0

    cost = wb("cost", again, "--json")
    assert cost.code == 0, cost.stderr


@pytest.mark.slow
def test_a_missing_original_file_is_rendered_again(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    first = _run(wb, manifest, "first", reuse=True)  # nothing to reuse yet: all three sent
    assert sim.ledger()["accepted"] == 3
    gone = next(r for r in export_jsonl(wb, first) if r["input"].get("seed") == 7)
    (tmp_path / "outputs" / str(gone["video_path"])).unlink()

    again = _run(wb, manifest, "again", reuse=True)
    assert sim.ledger()["accepted"] == 5  # the seed-7 job (its original is gone) and the unseeded one
    reused = {r["input"]["prompt"]: r["reused_from"] for r in export_jsonl(wb, again)}
    assert reused == {
        "Clouds drifting past the peak": None,
        "Night falls over the hills": next(
            r["job_id"] for r in export_jsonl(wb, first) if r["input"].get("seed") == 8
        ),
        "A lantern in the fog": None,
    }
