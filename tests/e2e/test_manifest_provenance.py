"""What a batch says about the manifest it came from, as a user iterating on one manifest meets it.

* A manifest named like a rerun batch (``NAME-rerun-1``) was merged into that rerun: its jobs were
  added, the rerun "moved" to the manifest, and the rerun's dataset card then claimed its parent
  was made from that file. ``submit`` and ``run`` refuse it now (exit 2, one line), nothing stored.
* An export of a batch whose manifest was edited between runs mixed the rows of earlier versions
  in with nothing to tell them apart, and its dataset card called ``manifest.yaml`` the text the
  batch was made from. Every record carries ``in_manifest`` now, and the card counts the others.
* A render fal refused (a 422 ``content_policy_violation`` in the result) was logged as
  ``download failed (content_policy_violation)``: the line says the render failed now.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl, processed

TWO = """\
name: {name}
endpoint: fal-ai/wan-22
defaults: {{resolution: 480p}}
items:
  - {{prompt: a paper boat in the rain, seed: 7}}
  - {{prompt: a cat on a roof, seed: 8}}
"""

SIX = """\
name: sixer
endpoint: fal-ai/wan-22
defaults:
  resolution: {resolution}
items:
  - {{prompt: A item, seed: 1}}
  - {{prompt: {b}, seed: 2}}
  - {{prompt: C item, seed: 3}}
  - {{prompt: D item, seed: 4}}
  - {{prompt: E item, seed: 5}}
  - {{prompt: F item, seed: 6}}
"""


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("simulate", [False, True], ids=["fal", "simulate"])
def test_a_manifest_named_like_a_rerun_is_refused_not_merged_into_it(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, simulate: bool
) -> None:
    flag = ["--simulate"] if simulate else []
    path = manifest("m", TWO.format(name="typo1"))
    processed(wb, "run", path, *flag)
    rerun = processed(wb, "rerun", "typo1", *flag)
    assert rerun["name"] == "typo1-rerun-1"
    before = wb("status", "typo1-rerun-1", "--json").json()

    rr = manifest("rr", TWO.format(name="typo1-rerun-1") + "  - {prompt: something new, seed: 9}\n")
    wanted = (
        "batch typo1-rerun-1 is a rerun of typo1 (made by `wanbatch rerun`); give the manifest another name"
    )
    for command in (["submit", rr], ["run", rr, *flag, "--no-progress"]):
        done = wb(*command)
        assert done.code == 2, (command, done.stderr)
        (line,) = _error_lines(done.stderr)
        assert wanted in line, line
        assert "moved" not in done.stderr
    refused = wb("submit", rr, "--json")
    assert refused.code == 2

    after = wb("status", "typo1-rerun-1", "--json").json()
    assert after["total"] == before["total"] == 2  # nothing added to the rerun
    # The rerun still names its parent's manifest: its hf card does not claim rr.yaml.
    out = path.parent / "hf-rerun"
    assert wb("export", "typo1-rerun-1", "--format", "hf", "-o", out).code == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "`m.yaml`" in card
    assert "rr.yaml" not in card


def _three_versions(wb: Wb, path: Path) -> None:
    """The audit's case: run six items, edit B's prompt and run, then 720p for all and run."""
    path.write_text(SIX.format(resolution="480p", b="B item"), encoding="utf-8")
    processed(wb, "run", path)
    path.write_text(SIX.format(resolution="480p", b="B item changed"), encoding="utf-8")
    processed(wb, "run", path)
    path.write_text(SIX.format(resolution="720p", b="B item changed"), encoding="utf-8")
    processed(wb, "run", path)


def _check_in_manifest(records: list[dict[str, Any]]) -> None:
    assert len(records) == 13
    current = [r for r in records if r["in_manifest"] is True]
    earlier = [r for r in records if r["in_manifest"] is False]
    assert len(current) == 6
    assert len(earlier) == 7
    assert sorted(r["item_index"] for r in current) == list(range(6))
    assert all(r["item_index"] >= 6 for r in earlier)
    assert {r["input"]["resolution"] for r in current} == {"720p"}
    assert "B item changed" in {r["input"]["prompt"] for r in current}
    assert "B item" not in {r["input"]["prompt"] for r in current}


def test_every_export_format_flags_rows_from_earlier_manifest_versions(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("m", SIX.format(resolution="480p", b="B item"))
    _three_versions(wb, path)

    _check_in_manifest(export_jsonl(wb, "sixer"))

    done = wb("export", "sixer", "--format", "csv")
    assert done.code == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert sorted(r["in_manifest"] for r in rows) == ["False"] * 7 + ["True"] * 6

    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "d.parquet"
    assert wb("export", "sixer", "--format", "parquet", "-o", parquet).code == 0
    table = pq.read_table(parquet)
    assert table.schema.field("in_manifest").type == pa.bool_()
    assert sorted(table.column("in_manifest").to_pylist()) == [False] * 7 + [True] * 6

    out = tmp_path / "hf1"
    hf = wb("export", "sixer", "--format", "hf", "-o", out, "--json")
    assert hf.code == 0, hf.stderr
    assert hf.json()["not_in_manifest"] == 7
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    for row in meta:
        row["input"] = json.loads(row["input"])
    _check_in_manifest(meta)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert (
        "7 of the 13 rows come from jobs no longer in manifest.yaml (an earlier version of it); "
        "their `in_manifest` is false"
    ) in card
    assert "the batch was made from" not in card  # manifest.yaml made only the other 6
    assert "only the rows whose `in_manifest` is true were made from it" in card
    assert "Rows are in the manifest's order," not in card


def test_a_batch_whose_manifest_never_changed_has_every_row_in_it(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("m", TWO.format(name="steady"))
    processed(wb, "run", path)
    assert [r["in_manifest"] for r in export_jsonl(wb, "steady")] == [True, True]
    out = tmp_path / "hf"
    assert wb("export", "steady", "--format", "hf", "-o", out).code == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "no longer in" not in card
    assert "the batch was made from" in card


def test_a_rerun_keeps_what_its_parents_manifest_holds(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = manifest("m", TWO.format(name="edited"))
    processed(wb, "run", path)
    path.write_text(TWO.format(name="edited").replace("a cat on a roof", "a dog on a roof"), encoding="utf-8")
    processed(wb, "run", path)
    processed(wb, "rerun", "edited")
    records = export_jsonl(wb, "edited-rerun-1")
    assert sorted((r["input"]["prompt"], r["in_manifest"]) for r in records) == [
        ("a cat on a roof", False),
        ("a dog on a roof", True),
        ("a paper boat in the rain", True),
    ]


def test_a_render_fal_refused_is_not_logged_as_a_failed_download(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, caplog: pytest.LogCaptureFixture
) -> None:
    sim.set_faults(model_error={"next": 1, "error_type": "content_policy_violation", "status": 422})
    path = manifest("m", "name: refused\nendpoint: fal-ai/wan-22\nitems:\n  - {prompt: forbidden, seed: 1}\n")
    done = wb("run", path, "--no-progress")
    assert done.code == 1, done.stderr
    said = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "job.download"]
    (line,) = [line for line in said if "(content_policy_violation)" in line]
    assert "download failed" not in line, line
    assert "fal's result: the render failed (content_policy_violation)" in line, line
