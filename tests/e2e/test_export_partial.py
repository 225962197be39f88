"""Exports of a batch that is not (or not wholly) a dataset yet say so, and an ``hf`` dataset
card says what it cost and where it came from.

An auditor playing a dataset builder found: an ``hf`` export of a batch with no succeeded job
wrote a folder ``datasets.load_dataset("json", …)`` fails on (``StopIteration``), exit 0, no
word; a mid-run export left the jobs in flight out (``hf``) or exported them without results
(``jsonl``/``csv``/``parquet``) without saying the batch had not finished; the card's cost was
the exported rows' only (a batch whose jobs failed "cost" $0.00 though it was billed); the
``hf`` metadata carried the machine's absolute output path; the card's ``manifest.yaml`` named an
``items_from`` file the dataset lacks; and a rerun of a rerun showed only the last command.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Run, Wb, export_jsonl, processed

TWO = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
items:
  - prompt: A paper boat on a rainy street
    seed: 1
  - prompt: A lantern over a calm lake
    seed: 2
"""

#: ``TWO`` with a third item: submitted over ``TWO``'s batch, it adds one pending job.
THREE = (
    TWO
    + """\
  - prompt: A heron in the reeds
    seed: 3
"""
)

#: One job that succeeds and one the provider refuses (it cannot fetch ``{missing}``: a 422,
#: billed as fal bills an input error once a runner looked at it).
ONE_FAILS = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - endpoint: fal-ai/wan-22
    prompt: A paper boat on a rainy street
    seed: 1
  - prompt: the provider cannot fetch this image
    image_url: {missing}
    seed: 4
"""

#: Only the job the provider refuses.
ONLY_FAILS = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: the provider cannot fetch this image
    image_url: {missing}
    seed: 4
"""


def _warnings(run: Run) -> list[str]:
    return [line for line in run.stderr.splitlines() if line.startswith("warning:")]


def _half_done(wb: Wb, manifest: MakeManifest, name: str) -> str:
    """A batch of three jobs: two succeeded, one pending (an item added by submitting again)."""
    batch: str = processed(wb, "run", manifest(name, TWO.format(name=name)))["batch"]
    again = wb("submit", manifest(name, THREE.format(name=name)))
    assert again.code == 0, again.stderr
    return batch


def test_hf_export_with_no_row_is_refused_and_leaves_nothing(
    wb: Wb, manifest: MakeManifest, tmp_path: Path
) -> None:
    """Submitted, never run: no job has a video. The folder would hold an empty
    ``metadata.jsonl`` that no loader reads; refused (exit 2, one line), nothing made."""
    assert wb("submit", manifest("idle", TWO.format(name="idle"))).code == 0
    target = tmp_path / "exports" / "ds"
    done = wb("export", "idle", "--format", "hf", "-o", target)
    assert done.code == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: batch idle has nothing to export as a dataset: none succeeded (2 pending)")
    assert "nothing was written" in line
    assert "export again once it has finished (`wanbatch status idle`" in line
    assert not (tmp_path / "exports").exists()  # nor the parent folder it would have made

    as_json = wb("export", "idle", "--format", "hf", "-o", target, "--json")
    assert as_json.code == 2
    assert as_json.json()["ok"] is False
    assert "nothing to export as a dataset" in as_json.json()["error"]
    assert not (tmp_path / "exports").exists()

    # The record formats have one record per job, finished or not: exported, with a warning.
    records = wb("export", "idle", "--format", "jsonl")
    assert records.code == 0
    assert len(records.stdout.splitlines()) == 2
    (warning,) = _warnings(records)
    assert "batch idle has not finished: 2 of 2 record(s) have no result yet (2 pending)" in warning


def test_hf_export_of_failed_jobs_only_points_at_include_failed(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    body = ONLY_FAILS.format(name="all-failed", missing=f"{sim.url}/files/nope/missing.png")
    run = wb("run", manifest("all-failed", body), "--json", "--no-progress")
    assert (run.json()["total"], run.json()["counts"]["failed"]) == (1, 1), run.stderr
    target = tmp_path / "ds"
    done = wb("export", "all-failed", "--format", "hf", "-o", target)
    assert done.code == 2
    assert "none succeeded (1 failed)" in done.stderr
    assert "`--include failed` exports the failed and cancelled ones" in done.stderr
    assert not target.exists()
    # With --include failed it is a dataset of one failure, which loads.
    assert wb("export", "all-failed", "--format", "hf", "-o", target, "--include", "failed").code == 0
    (row,) = [json.loads(line) for line in (target / "metadata.jsonl").read_text().splitlines()]
    assert (row["status"], row["file_name"], row["video_path"]) == ("failed", None, None)

    records = wb("export", "all-failed", "--format", "csv", "-o", tmp_path / "ds.csv", "--json")
    assert records.code == 0
    assert records.json()["warnings"] == [
        "no job of batch all-failed succeeded (1 failed): no record has a video"
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_record_export_of_an_unfinished_batch_warns(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, fmt: str
) -> None:
    batch = _half_done(wb, manifest, f"half-{fmt}")
    target = tmp_path / f"ds.{fmt}"
    done = wb("export", batch, "--format", fmt, "-o", target)
    assert done.code == 0, done.stderr
    (warning,) = _warnings(done)
    assert f"batch half-{fmt} has not finished: 1 of 3 record(s) have no result yet (1 pending)" in warning
    assert f"`wanbatch status half-{fmt}`" in warning

    as_json = wb("export", batch, "--format", fmt, "-o", target, "--json")
    assert as_json.code == 0
    summary = as_json.json()  # stdout stays one JSON object; the warning is in it and on stderr
    assert summary["records"] == 3
    (said,) = summary["warnings"]
    assert said in warning
    assert _warnings(as_json) == [warning]


def test_hf_export_of_an_unfinished_batch_warns_of_what_it_leaves_out(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    batch = _half_done(wb, manifest, "half-hf")
    folder = tmp_path / "hf"
    done = wb("export", batch, "--format", "hf", "-o", folder, "--json")
    assert done.code == 0, done.stderr
    summary = done.json()
    assert (summary["records"], summary["not_exported"]) == (2, {"pending": 1})
    (warning,) = summary["warnings"]
    assert warning.startswith(
        "batch half-hf has not finished: 1 job(s) without a result yet are left out (1 pending); "
        "export again once it has finished (`wanbatch status half-hf`"
    )
    assert _warnings(done) == [f"warning: {warning}"]
    card = (folder / "README.md").read_text()
    assert "- not exported (pending): 1" in card
    assert "every job included (so far: the batch has not finished)" in card


def test_hf_card_states_the_batch_billed_cost_beside_the_rows(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The failed job was billed: the dataset's rows cost less than the batch did, and the card
    says both, so the spend behind the dataset is not under-reported."""
    body = ONE_FAILS.format(name="billed", missing=f"{sim.url}/files/nope/missing.png")
    run = wb("run", manifest("billed", body), "--json", "--no-progress")
    counts = run.json()["counts"]
    assert (run.json()["total"], counts["succeeded"], counts["failed"]) == (2, 1, 1), run.stderr
    total = wb("cost", "billed", "--json").json()["total"]
    failed = next(r for r in export_jsonl(wb, "billed") if r["status"] == "failed")
    assert failed["cost_usd"] > 0  # the case: money that bought no row

    folder = tmp_path / "hf"
    done = wb("export", "billed", "--format", "hf", "-o", folder, "--json")
    assert done.code == 0, done.stderr
    summary = done.json()
    assert summary["batch_billed_usd"] == total["actual_usd"]
    assert summary["cost_usd"] == pytest.approx(total["actual_usd"] - failed["cost_usd"])
    assert summary["warnings"] == [
        "1 job(s) that ended without a video are left out (1 failed): `--include failed` adds them "
        "(file_name null)"
    ]
    lines = (folder / "README.md").read_text().splitlines()
    rows = next(line for line in lines if line.startswith("- cost of these rows: "))
    billed = next(line for line in lines if line.startswith("- billed for the whole batch: "))
    assert rows.startswith("- cost of these rows: $0.20 ")
    assert billed.startswith("- billed for the whole batch: $0.40 ")
    assert billed.endswith("every job included; $0.20 of it for jobs not in this dataset")


def test_hf_metadata_points_at_the_dataset_copy_never_the_machine_path(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run with the default-style relative ``WANBATCH_OUTPUT_DIR`` and exported from another
    folder: the outputs are outside ``./outputs`` there, so ``video_path`` of the record formats
    is absolute (as documented); the ``hf`` dataset's is its own copy's, relative to it."""
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "outputs")
    batch = processed(wb, "run", manifest("moved", TWO.format(name="moved")))["batch"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for record in export_jsonl(wb, batch):
        assert Path(record["video_path"]).is_absolute()
        assert Path(record["video_path"]).is_file()

    folder = elsewhere / "hf"
    assert wb("export", batch, "--format", "hf", "-o", folder).code == 0
    text = (folder / "metadata.jsonl").read_text()
    assert str(tmp_path) not in text
    for row in map(json.loads, text.splitlines()):
        assert row["video_path"] == row["file_name"]
        assert (folder / row["video_path"]).is_file()


ROWS_FROM_CSV = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
items:
  - prompt: A paper boat on a rainy street
    seed: 1
items_from: sub/rows.csv
"""


def test_hf_card_says_the_items_from_file_is_not_included(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, e2e_env: Path, tmp_path: Path
) -> None:
    """The batch stores the manifest's text, not its ``items_from`` file's: the dataset's
    ``manifest.yaml`` names a file it lacks, and the card says so rather than leave it dangling."""
    (e2e_env / "sub").mkdir()
    (e2e_env / "sub" / "rows.csv").write_text("prompt,seed\na fox in the snow,2\n", encoding="utf-8")
    processed(wb, "run", manifest("rows", ROWS_FROM_CSV.format(name="rows")))
    folder = tmp_path / "hf"
    done = wb("export", "rows", "--format", "hf", "-o", folder, "--json")
    assert done.code == 0, done.stderr
    assert done.json()["items_from"] == {"path": "sub/rows.csv", "included": False}
    assert "items_from: sub/rows.csv" in (folder / "manifest.yaml").read_text()
    assert not (folder / "sub").exists()
    card = (folder / "README.md").read_text()
    assert "- items_from: `sub/rows.csv`, which `manifest.yaml` names, is **not included**" in card

    plain = tmp_path / "plain"
    processed(wb, "run", manifest("plain", TWO.format(name="plain")))
    done = wb("export", "plain", "--format", "hf", "-o", plain, "--json")
    assert done.json()["items_from"] is None
    assert "items_from" not in (plain / "README.md").read_text()


def _generations(folder: Path) -> list[str]:
    lines = (folder / "README.md").read_text().splitlines()
    start = lines.index("- lineage (oldest first):")
    return [line for line in lines[start + 1 :] if line.startswith("  ")]


def test_hf_card_of_a_rerun_of_a_rerun_shows_every_generation(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    root = processed(wb, "run", manifest("gen", TWO.format(name="gen")))["batch"]
    child = processed(wb, "rerun", root, "--new-seeds")["batch"]
    grandchild = processed(wb, "rerun", child, "--vary", "resolution=480p,720p", "--max-usd", "9")["batch"]

    folder = tmp_path / "grandchild"
    assert wb("export", grandchild, "--format", "hf", "-o", folder).code == 0
    assert _generations(folder) == [
        f"  1. batch `gen` (`{root}`): `wanbatch run <manifest>`",
        f"  2. batch `gen-rerun-1` (`{child}`): `wanbatch rerun {root} --new-seeds`",
        f"  3. batch `gen-rerun-1-rerun-1` (`{grandchild}`, this dataset): "
        f"`wanbatch rerun {child} --max-usd 9 --vary resolution=480p,720p`",
    ]
    # A rerun of a manifest's batch: `rerun of` and `generated` say it all, no lineage.
    single = tmp_path / "child"
    assert wb("export", child, "--format", "hf", "-o", single).code == 0
    assert "lineage" not in (single / "README.md").read_text()

    # A generation stored before rerun options were kept says so in its place.
    with sqlite3.connect(tmp_path / "wanbatch.db") as conn:
        conn.execute("UPDATE batches SET rerun_options = NULL WHERE id = ?", (child,))
    conn.close()
    old = tmp_path / "old"
    assert wb("export", grandchild, "--format", "hf", "-o", old).code == 0
    assert _generations(old)[1].startswith(
        f"  2. batch `gen-rerun-1` (`{child}`): `wanbatch rerun {root}` with options that were not recorded"
    )
