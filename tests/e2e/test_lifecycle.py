"""Rerun, cancel and budget end to end, checked against files, exports and the simulator ledger."""

from __future__ import annotations

import hashlib
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, counts, export_jsonl

# TWO_JOBS has no seeds: the provider picks them, so reproducing the outputs needs the seeds it returned.


def _by_item(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["item_index"]: r for r in records}


@pytest.mark.slow
def test_rerun_reproduces_bytes_and_new_seeds_change_them(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("repro", TWO_JOBS.format(name="repro"))
    first = wb("run", path, "--json", "--no-progress")
    assert first.code == 0, first.stderr
    parent = first.json()["batch"]
    original = _by_item(export_jsonl(wb, parent))
    assert all(r["status"] == "succeeded" for r in original.values())
    assert all(isinstance(r["seed"], int) for r in original.values())

    again = wb("rerun", parent, "--json", "--no-progress")
    assert again.code == 0, again.stderr
    child = again.json()
    assert child["batch"] != parent
    assert child["parent_batch"] == parent
    assert wb("status", child["batch"], "--json").json()["parent_batch"] == parent
    repeated = _by_item(export_jsonl(wb, child["batch"]))
    assert repeated.keys() == original.keys()
    for index, rec in repeated.items():
        assert rec["status"] == "succeeded"
        assert rec["seed"] == original[index]["seed"]
        assert rec["job_id"] != original[index]["job_id"]
        assert rec["request_id"] != original[index]["request_id"]
        assert rec["video_sha256"] == original[index]["video_sha256"]
        video = tmp_path / "outputs" / str(rec["video_path"])
        assert hashlib.sha256(video.read_bytes()).hexdigest() == original[index]["video_sha256"]

    fresh = wb("rerun", parent, "--new-seeds", "--json", "--no-progress")
    assert fresh.code == 0, fresh.stderr
    reseeded = _by_item(export_jsonl(wb, fresh.json()["batch"]))
    assert reseeded.keys() == original.keys()
    for index, rec in reseeded.items():
        assert rec["status"] == "succeeded"
        assert rec["seed"] != original[index]["seed"]
        assert rec["input"]["seed"] == rec["seed"]  # recorded before sending: itself reproducible
        assert rec["video_sha256"] != original[index]["video_sha256"]
    assert sim.ledger()["accepted"] == 6


def test_cancel_before_running_sends_nothing(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("stopped", TWO_JOBS.format(name="stopped"))
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    batch = submitted.json()["batch"]
    cancel = wb("cancel", batch, "--json", "--no-progress")
    assert cancel.code == 1, cancel.stdout + cancel.stderr
    report = cancel.json()
    assert report["counts"]["cancelled"] == 2
    assert report["total"] == 2
    records = export_jsonl(wb, batch)
    assert [r["status"] for r in records] == ["cancelled", "cancelled"]
    assert all(r["request_id"] is None for r in records)
    assert sim.ledger()["accepted"] == 0
    assert not list((tmp_path / "outputs").rglob("*.mp4"))
    assert counts(f"sqlite:///{tmp_path / 'wanbatch.db'}") == (1, 2)


def test_budget_cap_is_never_exceeded(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    # 4 jobs × $0.20 = $0.80 against a $0.50 cap: two fit, two must never be sent.
    path = manifest(
        "capped",
        """\
name: capped
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
  num_frames: 81
matrix:
  seed: [1, 2, 3, 4]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
budget:
  max_usd: 0.50
""",
    )
    estimate = wb("estimate", path, "--json").json()
    assert estimate["usd"] == pytest.approx(0.8)
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 1, run.stderr
    report = run.json()
    assert report["counts"]["succeeded"] == 2
    assert report["counts"]["cancelled"] == 2
    assert report["spent_usd"] <= 0.50
    records = export_jsonl(wb, report["batch"])
    cancelled = [r for r in records if r["status"] == "cancelled"]
    assert len(cancelled) == 2
    assert all(r["error_type"] == "budget" for r in cancelled)
    assert all("budget" in r["error"] for r in cancelled)
    ledger = sim.ledger()
    assert ledger["accepted"] == 2
    assert Decimal(ledger["billed_usd"]) <= Decimal("0.50")
    assert Decimal(ledger["billed_usd"]) == Decimal(str(report["spent_usd"]))
