"""A manifest URL fal cannot download is paid for once, not by every job that shares it.

The audit's run: ``image_url`` on a file fal's storage no longer has, a ``matrix`` of seeds;
every job was sent and each paid fal's 422 (20 failed, spent $4.00, wasted $4.00). Now the first
job's 422 stops the rest: they fail unsent (``input_unreachable``), naming the URL and the field.
"""

from __future__ import annotations

import pytest

from falsim.server import SimulatorHandle
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

SEEDS = 12


def test_a_dead_input_url_is_paid_for_once(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "WANBATCH_MAX_OUTSTANDING", "1"
    )  # one at fal at a time: none sent before the first fails
    get_settings.cache_clear()
    dead = f"{sim.url}/files/gone/b.jpg"
    seeds = ", ".join(str(s) for s in range(1, SEEDS + 1))
    path = manifest(
        "dead-url",
        f"name: dead-url\nendpoint: fal-ai/wan-i2v\ndefaults: {{resolution: 480p}}\n"
        f"items:\n  - prompt: a boat\n    image_url: {dead}\nmatrix:\n  seed: [{seeds}]\n",
    )
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 1, run.stderr
    report = run.json()
    assert report["counts"]["failed"] == SEEDS
    assert sim.ledger()["accepted"] == 1
    assert report["spent_usd"] == pytest.approx(0.20)
    assert report["wasted_usd"] == pytest.approx(0.20)

    records = export_jsonl(wb, report["batch"])
    sent = [r for r in records if r["attempts"]]
    unsent = [r for r in records if not r["attempts"]]
    assert len(sent) == 1
    assert "Failed to download the file" in sent[0]["error"]
    assert len(unsent) == SEEDS - 1
    for record in unsent:
        assert record["status"] == "failed"
        assert record["error_type"] == "input_unreachable"
        assert record["error"].startswith(f"not sent: fal could not download {dead} (image_url)")
    (group,) = [g for g in report["failures"] if g["error_type"] == "input_unreachable"]
    assert group["count"] == SEEDS - 1
    assert group["sent"] is False
