"""Every output is probed before it counts (issue #13): a correct simulator render is not flagged;
a ``bad_render`` is flagged in ``export``, ``status`` and ``cost`` — and failed, billed, with
``WANBATCH_MEDIA_MISMATCH=fail``."""

from __future__ import annotations

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

TWO_JOBS = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
items:
  - prompt: A paper boat drifting down a rainy street
  - prompt: A lantern over a calm lake
"""


@pytest.mark.slow
def test_a_bad_render_is_flagged_and_a_correct_one_is_not(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    sim.set_faults(bad_render={"next": 1, "frames": 33})
    run = wb("run", manifest("flagged", TWO_JOBS.format(name="flagged")), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]
    records = export_jsonl(wb, batch)
    assert [r["status"] for r in records] == ["succeeded", "succeeded"]
    flagged = [r for r in records if r["media_mismatch"]]
    assert len(flagged) == 1
    assert "33 frames, expected 81" in flagged[0]["media_mismatch"]
    assert flagged[0]["media"]["frames"] == 33
    (good,) = [r for r in records if not r["media_mismatch"]]
    assert good["media"] == {
        "width": 854,
        "height": 480,
        "frames": 81,
        "fps": 16.0,
        "duration": pytest.approx(5.06, abs=0.01),  # the contract's name
        "duration_s": good["media"]["duration"],  # the same, as exports before had it
        "codec": good["media"]["codec"],
    }
    assert wb("status", batch, "--json").json()["media_mismatches"] == 1
    assert "1 video(s) not as requested" in wb("status", batch).stdout
    assert wb("cost", batch, "--json").json()["media_mismatches"] == 1
    assert "1 video(s) not as requested" in wb("cost", batch).stdout


@pytest.mark.slow
def test_with_media_mismatch_fail_a_bad_render_fails_with_its_cost(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_MEDIA_MISMATCH", "fail")
    sim.set_faults(bad_render={"next": 1, "size": [320, 240]})
    run = wb("run", manifest("strict", TWO_JOBS.format(name="strict")), "--json", "--no-progress")
    assert run.code == 1, run.stderr
    report = run.json()
    assert report["counts"]["failed"] == 1
    assert report["counts"]["succeeded"] == 1
    (bad,) = [r for r in export_jsonl(wb, report["batch"]) if r["status"] == "failed"]
    assert bad["error_type"] == "media_mismatch"
    assert "size 320x240" in bad["error"]
    assert "short side 240, expected 480" in bad["media_mismatch"]
    assert bad["media"]["width"] == 320
    assert bad["video_path"] is None
    assert bad["cost_usd"] == bad["est_usd"]  # billed: fal made the clip
    assert wb("status", report["batch"], "--json").json()["wasted_usd"] == pytest.approx(bad["cost_usd"])
