"""Outputs are only fetched from allowed hosts; a refused download is held (its batch paused with
the setting that would allow the host), billed, never redone."""

from __future__ import annotations

import pytest

from falsim.server import SimulatorHandle
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

ONE_JOB = """\
name: guarded
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat in the rain
    resolution: 480p
    seed: 5
"""


def _fal_at_localhost(sim: SimulatorHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """Talk to the simulator as ``localhost``: its result URLs (on ``127.0.0.1``) are then on a
    host that is not a configured fal URL's, as a CDN or an attacker's URL would be."""
    url = sim.url.replace("127.0.0.1", "localhost")
    monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", url)
    monkeypatch.setenv("WANBATCH_FAL_REST_URL", url)


def test_a_result_on_a_host_outside_the_allow_list_is_held_and_billed(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fal_at_localhost(sim, monkeypatch)
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", "*.fal.media,storage.googleapis.com")
    get_settings.cache_clear()
    run = wb("run", manifest("guarded", ONE_JOB), "--json", "--no-progress")
    assert run.code == 2, run.stderr  # paused: the setting decides, not the file
    (record,) = export_jsonl(wb, run.json()["batch"])
    assert record["status"] == "downloading"
    assert record["error"] is None
    assert record["video_path"] is None
    port = sim.url.rsplit(":", 1)[1]
    reason = run.json()["pause_reason"]
    assert "not in the allow-list" in reason
    assert f"WANBATCH_DOWNLOAD_ALLOWED_HOSTS=*.fal.media,storage.googleapis.com,127.0.0.1:{port}" in reason
    # fal produced the video, so it was paid for: the batch counts it spent, nothing wasted yet
    assert run.json()["spent_usd"] == pytest.approx(record["est_usd"])
    assert run.json()["wasted_usd"] == 0
    assert sim.ledger()["accepted"] == 1  # and it was not generated again


def test_allowed_hosts_let_the_download_through(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fal_at_localhost(sim, monkeypatch)
    monkeypatch.setenv("WANBATCH_DOWNLOAD_ALLOWED_HOSTS", "127.0.0.1")
    get_settings.cache_clear()
    run = wb("run", manifest("guarded", ONE_JOB), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == 1


def test_by_default_a_loopback_result_url_is_refused_unless_it_is_the_fal_host(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the simulator's own host (the configured fal URL) is fine: that is how --simulate works
    run = wb("run", manifest("trusted", ONE_JOB.replace("guarded", "trusted")), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    # the same loopback address reached through another name is refused (held), and billed
    _fal_at_localhost(sim, monkeypatch)
    get_settings.cache_clear()
    run = wb("run", manifest("guarded", ONE_JOB), "--json", "--no-progress")
    assert run.code == 2, run.stderr
    (record,) = export_jsonl(wb, run.json()["batch"])
    assert record["status"] == "downloading"
    assert "loopback address" in run.json()["pause_reason"]
    assert "WANBATCH_DOWNLOAD_ALLOWED_HOSTS=127.0.0.1:" in run.json()["pause_reason"]
    assert run.json()["spent_usd"] == pytest.approx(record["est_usd"])
    assert sim.ledger()["accepted"] == 2  # one generation per job, none again
