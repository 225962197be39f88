"""Provider-side failures end to end: a 422 field error, a persistent and a transient model error."""

from __future__ import annotations

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

ONE_JOB = """\
name: {name}
endpoint: fal-ai/wan-22
items:
  - prompt: A paper boat drifting down a rainy street
    resolution: 480p
"""


@pytest.mark.slow
def test_provider_422_fails_the_job_with_the_field_error(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    # Our validator accepts any well-formed http(s) URL without fetching it; the provider then
    # fails to download it — a file on the simulator's own storage host that does not exist.
    missing = f"{sim.url}/files/nope/missing.png"
    path = manifest(
        "bad-url",
        f"""\
name: bad-url
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: the provider cannot fetch this
    image_url: {missing}
  - prompt: this one is fine
    image_url: images/landscape.jpg
""",
    )
    assert wb("validate", path).code == 0
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 1, run.stderr
    report = run.json()
    assert report["counts"]["failed"] == 1
    assert report["counts"]["succeeded"] == 1
    records = {r["item_index"]: r for r in export_jsonl(wb, report["batch"])}
    bad, good = records[0], records[1]
    assert bad["status"] == "failed"
    assert "422" in bad["error"]
    assert "image_url" in bad["error"]
    assert "Failed to download the file" in bad["error"]
    assert bad["video_path"] is None
    assert good["status"] == "succeeded"
    assert good["error"] is None
    # A 422 is final: sent once, never retried.
    assert bad["attempts"] == 1
    assert sim.ledger()["accepted"] == 2

    # rerun --failed-only takes only the failed job (and it fails again, the same way).
    rerun = wb("rerun", report["batch"], "--failed-only", "--json", "--no-progress")
    assert rerun.code == 1, rerun.stderr
    again = rerun.json()
    assert again["batch"] != report["batch"]
    assert again["total"] == 1
    assert again["parent_batch"] == report["batch"]
    (only,) = export_jsonl(wb, again["batch"])
    assert only["item_index"] == 0
    assert only["input"]["image_url"] == missing
    assert only["status"] == "failed"


def test_persistent_model_error_fails_after_max_attempts(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_MAX_ATTEMPTS", "3")
    sim.set_faults(model_error={"probability": 1.0})
    path = manifest("doomed", ONE_JOB.format(name="doomed"))
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 1, run.stderr
    report = run.json()
    assert report["counts"]["failed"] == 1
    (rec,) = export_jsonl(wb, report["batch"])
    assert rec["status"] == "failed"
    assert rec["attempts"] == 3
    assert "runner_disconnected" in rec["error"]
    assert "503" in rec["error"]
    assert rec["error_type"] == "runner_disconnected"
    assert "3 attempt" in rec["error"]
    ledger = sim.ledger()
    assert ledger["accepted"] == 3  # each attempt is a new request at fal
    assert {e["outcome"] for e in ledger["entries"]} == {"error"}
    assert report["spent_usd"] == 0  # fal does not bill its own runner failures


def test_transient_model_error_is_retried_once(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    sim.set_faults(model_error={"next": 1})
    path = manifest("flaky", ONE_JOB.format(name="flaky"))
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    (rec,) = export_jsonl(wb, run.json()["batch"])
    assert rec["status"] == "succeeded"
    assert rec["attempts"] == 2
    assert rec["error"] is None
    ledger = sim.ledger()
    assert ledger["accepted"] == 2
    assert sorted(str(e["outcome"]) for e in ledger["entries"]) == ["error", "ok"]
    assert rec["request_id"] in {e["request_id"] for e in ledger["entries"] if e["outcome"] == "ok"}
