"""A manifest edited to write out an endpoint's documented default (or to leave one out), run
again under the same name: the jobs it had already sent are not sent again.

A job's key is its input as written, so ``num_frames: 81`` added to a manifest whose endpoint
renders 81 frames anyway gave every job a new key: the old jobs were marked no longer in the
manifest and the new ones rendered and billed again, for the same videos (``reuse_outputs``
did not catch it either: it looks twins up by key). A pinned-seed job the batch already sent
(or rendered) is now that item's job; a job without a seed is another request (fal draws a
new seed), so it is sent, as before."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

BODY = (
    "name: wd\nendpoint: fal-ai/wan-i2v\nreuse_outputs: {reuse}\n"
    "defaults: {{resolution: 480p{extra}}}\nitems:\n"
    "  - {{prompt: item A, seed: 11, image_url: images/landscape.jpg}}\n"
    "  - {{prompt: item B, seed: 12, image_url: images/square.png}}\n"
    "  - {{prompt: item C unseeded, image_url: images/landscape.jpg}}\n"
    "  - {{endpoint: fal-ai/wan-22, prompt: item D, seed: 14}}\n"
)


def _body(extra: str = "", reuse: bool = False) -> str:
    return BODY.format(extra=extra, reuse=str(reuse).lower())


@pytest.fixture
def any_db(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both dialects; through ``engine``, which empties the shared PostgreSQL database after."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", db_url)
    return db_url


PINNED = (11, 12, 14)


def _sent_seeds(sim: SimulatorHandle) -> Counter[Any]:
    """How many submits the simulator accepted per pinned seed (``drawn``: the unseeded job's,
    a seed the simulator drew)."""
    return Counter(e["seed"] if e["seed"] in PINNED else "drawn" for e in sim.ledger()["entries"])


def _ledger(sim: SimulatorHandle) -> tuple[int, int]:
    snapshot = sim.ledger()
    return snapshot["accepted"], snapshot["billed_count"]


@pytest.mark.parametrize("reuse", [False, True])
def test_writing_out_a_default_does_not_send_the_jobs_already_rendered_again(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str, reuse: bool
) -> None:
    path = manifest("wd", _body(reuse=reuse))
    first = wb("run", path, "--no-progress")
    assert first.code == 0, first.stderr
    assert _ledger(sim) == (4, 4)
    before = {r["input"]["prompt"]: r for r in export_jsonl(wb, "wd")}

    # The endpoints' own default, written out: the same request to fal for every job.
    path.write_text(_body(", num_frames: 81", reuse=reuse), encoding="utf-8")
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    report = submitted.json()
    # A, B and D are the jobs already rendered; C (no seed) is another request: a new job.
    assert (report["added"], report["existing"], report.get("defaults_matched")) == (1, 3, 3)
    assert (report["not_in_manifest"], report["total"]) == (1, 5)
    line = (
        "3 job(s) of the manifest ask what jobs batch wd already sent ask once the endpoint's "
        "documented defaults are filled in"
    )
    assert line in submitted.stderr
    assert any(line in w for w in report["warnings"])

    run = wb("run", path, "--no-progress")
    assert run.code == 0, run.stderr
    assert _ledger(sim) == (5, 5)  # C only, with its new seed
    assert _sent_seeds(sim) == Counter({11: 1, 12: 1, 14: 1, "drawn": 2})
    records = {(r["input"]["prompt"], r["in_manifest"]): r for r in export_jsonl(wb, "wd")}
    assert len(records) == 5
    for prompt in ("item A", "item B", "item D"):
        kept = records[(prompt, True)]
        # The same job, video and key: its input as it was sent (no num_frames written).
        assert kept["job_id"] == before[prompt]["job_id"]
        assert (kept["attempts"], kept["request_id"]) == (1, before[prompt]["request_id"])
        assert kept["video_path"] == before[prompt]["video_path"]
        assert "num_frames" not in kept["input"]
        assert kept["status"] == "succeeded"
    assert [records[(p, True)]["item_index"] for p in ("item A", "item B", "item C unseeded", "item D")] == [
        0,
        1,
        2,
        3,
    ]
    assert records[("item C unseeded", False)]["item_index"] == 4
    assert records[("item C unseeded", True)]["input"]["num_frames"] == 81

    # Idempotent: the same edited manifest again adds nothing and sends nothing.
    again = wb("run", path, "--json", "--no-progress")
    assert again.code == 0, again.stderr
    assert _ledger(sim) == (5, 5)
    resubmitted = wb("submit", path, "--json").json()
    assert (resubmitted["added"], resubmitted["existing"], resubmitted["total"]) == (0, 4, 5)

    # The default left out again: every job is the stored one, by its own key.
    path.write_text(_body(reuse=reuse), encoding="utf-8")
    back = wb("run", path, "--json", "--no-progress")
    assert back.code == 0, back.stderr
    assert _ledger(sim) == (5, 5)

    # A new render is still there for the asking: a rerun sends them again.
    rerun = wb("rerun", "wd", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    assert sim.ledger()["accepted"] > 5


def test_a_written_out_default_left_out_again_is_not_sent_again(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    """The other way round: the first run wrote the default out, the edit leaves it out."""
    path = manifest("wd", _body().replace("resolution: 480p", "resolution: 720p"))
    assert wb("run", path, "--no-progress").code == 0
    assert _ledger(sim) == (4, 4)

    path.write_text(_body().replace("defaults: {resolution: 480p}\n", ""), encoding="utf-8")
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    assert _ledger(sim) == (5, 5)  # the unseeded job only
    assert _sent_seeds(sim) == Counter({11: 1, 12: 1, 14: 1, "drawn": 2})
