"""Outputs are only fetched from allowed hosts; a refused or failed download is billed, not redone."""

from __future__ import annotations

import pytest
from e2e_helpers import MakeManifest, Wb, export_jsonl

from jobs.settings import get_settings
from worker.simulator.server import SimulatorHandle

ONE_JOB = """\
name: guarded
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat in the rain
    resolution: 480p
    seed: 5
"""


def test_a_result_on_a_host_outside_the_allow_list_fails_at_once_and_is_billed(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", "*.fal.media,storage.googleapis.com")
    get_settings.cache_clear()
    run = wb("run", manifest("guarded", ONE_JOB), "--json", "--no-progress")
    assert run.code == 1, run.stderr
    (record,) = export_jsonl(wb, run.json()["batch"])
    assert record["status"] == "failed"
    assert "allow-list" in record["error"]
    assert record["error_type"] == "download_failed"
    assert record["video_path"] is None
    # fal produced the video, so it was paid for: the job records the cost and it counts as wasted
    assert record["cost_usd"] == pytest.approx(record["est_usd"])
    assert run.json()["wasted_usd"] == pytest.approx(record["est_usd"])
    assert sim.ledger()["accepted"] == 1  # and it was not generated again


def test_allowed_hosts_let_the_download_through(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", "127.0.0.1")
    get_settings.cache_clear()
    run = wb("run", manifest("guarded", ONE_JOB), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == 1
