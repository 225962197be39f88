"""Audit findings on ``diff`` and ``export``: what the database records is not the whole verdict.

1. A video replaced or deleted on disk was "same" (exit 0): ``diff`` compared only the SHA-256
   recorded. Each compared video is now looked at (one ``lstat``, its size against the recorded
   one; ``--verify`` hashes it), and an export warns of records whose video is gone.
2. A pair whose inputs differ (``rerun --vary``) read "different: video", as if fal were not
   deterministic: the input fields that differ are named, and so is how the pair was matched.
3. Exports and sidecars now carry a rerun's lineage (``rerun_of``, ``parent_batch``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.e2e_helpers import FAST_ENV, TWO_JOBS, MakeManifest, Wb, export_jsonl, processed


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in FAST_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line


def _simulated(wb: Wb, command: str, *args: str | Path) -> str:
    return str(processed(wb, command, *args, "--simulate")["batch"])


def _videos(wb: Wb, batch: str, outputs: Path) -> dict[str, Path]:
    """Job id → its video on disk."""
    return {r["job_id"]: outputs / r["video_path"] for r in export_jsonl(wb, batch)}


def test_a_video_replaced_or_deleted_on_disk_is_no_longer_the_same(
    wb: Wb, manifest: MakeManifest, tmp_path: Path
) -> None:
    parent = _simulated(wb, "run", manifest("disk", TWO_JOBS.format(name="disk")))
    exact = _simulated(wb, "rerun", parent)
    done = wb("diff", parent, exact, "--json")
    assert done.code == 0, done.stdout + done.stderr
    assert done.json()["identical"] is True

    videos = _videos(wb, exact, tmp_path / "outputs")
    (first, replaced), (second, deleted) = sorted(videos.items())
    replaced.write_bytes(b"garbage")  # another size
    deleted.unlink()

    done = wb("diff", parent, exact, "--json")
    assert done.code == 1, done.stdout + done.stderr
    report: dict[str, Any] = done.json()
    assert report["identical"] is False
    assert (report["same"], report["different"]) == (0, 2)
    by_b = {job["b"]["job_id"]: job for job in report["jobs"]}
    assert "changed on disk" in by_b[first]["differs"]
    assert by_b[first]["b"]["on_disk"] == "changed on disk"
    assert by_b[first]["b"]["video_path"] == str(replaced)
    assert "missing on disk" in by_b[second]["differs"]
    assert by_b[second]["b"]["on_disk"] == "missing"
    assert by_b[second]["b"]["video_path"] == str(deleted)
    assert all(job["a"]["on_disk"] == "ok" for job in report["jobs"])
    assert "video" not in by_b[first]["differs"]  # the recorded bytes are the same: no non-determinism

    human = wb("diff", parent, exact)
    assert human.code == 1
    assert "0 same, 2 different" in human.stdout
    assert str(deleted) in " ".join(human.stdout.split()) or deleted.name in human.stdout

    # The same size, other bytes: only --verify, which hashes every video, sees it.
    exact2 = _simulated(wb, "rerun", parent)
    (video, *_) = _videos(wb, exact2, tmp_path / "outputs").values()
    data = bytearray(video.read_bytes())
    data[-1] ^= 0xFF
    video.write_bytes(bytes(data))
    assert wb("diff", parent, exact2, "--json").code == 0  # by size alone: unseen
    done = wb("diff", parent, exact2, "--json", "--verify")
    assert done.code == 1, done.stdout + done.stderr
    assert done.json()["different"] == 1
    assert any("changed on disk" in job["differs"] for job in done.json()["jobs"])

    # An export says how many of its records name a video that is not there, and does not fail.
    for fmt in ("jsonl", "csv"):
        out = wb("export", exact, "--format", fmt, "-o", str(tmp_path / f"x.{fmt}"))
        assert out.code == 0, out.stderr
        text = " ".join(out.stderr.split())
        assert "1 record(s) name a video that is not on disk" in text, out.stderr
        assert text.count("not on disk") == 1
    assert "not on disk" not in wb("export", parent, "--format", "jsonl").stderr


def test_a_moved_project_is_not_reported_missing(
    wb: Wb, manifest: MakeManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output folder moved elsewhere (WANBATCH_OUTPUT_DIR now names the new place): the
    videos are found there (jobs.moved_outputs), not reported missing."""
    parent = _simulated(wb, "run", manifest("moved", TWO_JOBS.format(name="moved")))
    exact = _simulated(wb, "rerun", parent)
    moved = tmp_path / "elsewhere"
    (tmp_path / "outputs").rename(moved)
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(moved))
    done = wb("diff", parent, exact, "--json")
    assert done.code == 0, done.stdout + done.stderr
    assert all(job["a"]["on_disk"] == job["b"]["on_disk"] == "ok" for job in done.json()["jobs"])
    # Where the videos were recorded, nothing is there any more: reported, not taken for same.
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    done = wb("diff", parent, exact, "--json")
    assert done.code == 1


def test_a_varied_rerun_names_the_input_fields_that_differ_and_how_it_was_matched(
    wb: Wb, manifest: MakeManifest
) -> None:
    parent = _simulated(wb, "run", manifest("vary", TWO_JOBS.format(name="vary")))
    varied = _simulated(wb, "rerun", parent, "--vary", "resolution=720p")
    done = wb("diff", parent, varied, "--json")
    assert done.code == 1
    for job in done.json()["jobs"]:
        assert job["matched_by"] == "origin"
        assert "input:resolution" in job["differs"], job["differs"]
        assert job["input_differs"] == ["resolution"]
    human = wb("diff", parent, varied)
    rows = [line for line in human.stdout.splitlines() if line.startswith(("0", "1"))]
    assert len(rows) == 2, human.stdout
    assert all("input:resolution" in row for row in rows), human.stdout
    assert human.stdout.count("by origin") == 2, human.stdout  # under each row's result


def test_exports_and_sidecars_carry_a_reruns_lineage(wb: Wb, manifest: MakeManifest, tmp_path: Path) -> None:
    parent = _simulated(wb, "run", manifest("lineage", TWO_JOBS.format(name="lineage")))
    varied = _simulated(wb, "rerun", parent, "--vary", "resolution=480p,720p")
    originals = {r["item_index"]: r for r in export_jsonl(wb, parent)}
    assert all(r["rerun_of"] is None and r["parent_batch"] is None for r in originals.values())
    records = export_jsonl(wb, varied)
    assert len(records) == 4
    for rec in records:
        assert rec["parent_batch"] == parent
        assert rec["rerun_of"] == originals[rec["item_index"]]["job_id"]
        video = tmp_path / "outputs" / rec["video_path"]
        written = json.loads(video.with_suffix(".json").read_text(encoding="utf-8"))
        assert (written["rerun_of"], written["parent_batch"]) == (rec["rerun_of"], parent)
    out = wb("export", varied, "--format", "csv")
    header = out.stdout.splitlines()[0].split(",")
    assert {"rerun_of", "parent_batch"} <= set(header)
