"""The Hugging Face export as its loaders read it, without needing ``datasets`` installed.

``datasets.load_dataset("json", ...)`` and ``"videofolder"`` read ``metadata.jsonl`` with
pyarrow's JSON reader, which makes a column of numbers float64 as soon as one exceeds int64: a
seed of 2**64 - 1 came back as 1.8446744073709552e+19 and could no longer reproduce its video.
``seed_text`` (the seed as decimal text) is what those loaders read exactly; reading the file
with ``pyarrow.json`` here pins that, as ``datasets`` itself would read it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import operator
import re
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.json as paj
import pytest

from falsim.server import SimulatorHandle
from jobs import dataset_export
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, export_jsonl, processed

MAX_SEED = 2**64 - 1

BIG_SEEDS = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: huge seed
    image_url: images/landscape.jpg
    seed: 18446744073709551615
  - prompt: small seed
    image_url: images/landscape.jpg
    seed: 5
  - endpoint: fal-ai/wan-22
    prompt: a paper boat
    seed: 9007199254740993
"""


def _hf_export(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, name: str) -> Path:
    run = wb("run", manifest(name, BIG_SEEDS.format(name=name)), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    folder = tmp_path / "exports" / "hf"
    export = wb("export", run.json()["batch"], "--format", "hf", "-o", folder)
    assert export.code == 0, export.stderr
    return folder


def test_hf_metadata_keeps_every_seed_exact_for_float64_json_readers(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    folder = _hf_export(wb, sim, manifest, tmp_path, "hf-big-seeds")
    metadata = folder / "metadata.jsonl"
    lines = [json.loads(x) for x in metadata.read_text().splitlines()]
    assert sorted(r["seed"] for r in lines) == [5, 9007199254740993, MAX_SEED]
    for row in lines:
        assert row["seed_text"] == str(row["seed"])

    # What datasets' json and videofolder loaders get: `seed` rounded, `seed_text` exact.
    table = paj.read_json(metadata)
    assert table.schema.field("seed").type == pa.float64()
    assert table.schema.field("seed_text").type == pa.string()
    assert sorted(int(s) for s in table.column("seed_text").to_pylist()) == [5, 9007199254740993, MAX_SEED]

    card = (folder / "README.md").read_text()
    assert "`seed_text`" in card
    assert 'int(ds["train"]["seed_text"][0])' in card


def test_every_export_format_has_seed_text(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    run = wb("run", manifest("all-formats", BIG_SEEDS.format(name="all-formats")), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]
    records = export_jsonl(wb, batch)
    assert {r["seed_text"] for r in records} == {"5", "9007199254740993", str(MAX_SEED)}
    csv_out = wb("export", batch, "--format", "csv")
    assert csv_out.code == 0, csv_out.stderr
    assert str(MAX_SEED) in csv_out.stdout
    assert "seed,seed_text," in csv_out.stdout.splitlines()[0]


def _sqlite(tmp_path: Path, sql: str) -> None:
    """Change the test's database as an older wanbatch would have left it."""
    with contextlib.closing(sqlite3.connect(tmp_path / "wanbatch.db")) as conn, conn:
        conn.execute(sql)


def test_hf_card_names_the_manifest_without_its_local_folder(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The card is the file meant to be published: the manifest's absolute path (a home
    directory, a user name) must not be in it, whether the manifest was included or not. The
    manifest included is the text the batch was made from, stored with it: the file may have
    been edited or deleted since."""
    body = BIG_SEEDS.format(name="hf-card-path")
    path = manifest("hf-card-path", body)
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]

    copied = tmp_path / "exports" / "copied"
    export = wb("export", batch, "--format", "hf", "-o", copied, "--json")
    assert export.code == 0, export.stderr
    assert (export.json()["manifest"], export.json()["manifest_source"]) == ("manifest.yaml", "stored")
    card = (copied / "README.md").read_text()
    assert "- manifest: `manifest.yaml` (the text of `hf-card-path.yaml` the batch was made from" in card
    assert str(path.parent) not in card
    assert str(tmp_path) not in card
    assert (copied / "manifest.yaml").read_text(encoding="utf-8") == body

    # Edited (not submitted again), then deleted: the dataset still gets the text the batch was made from.
    path.write_text(body.replace("huge seed", "an edit nobody submitted"), encoding="utf-8")
    edited = tmp_path / "exports" / "edited"
    assert wb("export", batch, "--format", "hf", "-o", edited).code == 0
    assert (edited / "manifest.yaml").read_text(encoding="utf-8") == body
    path.unlink()
    deleted = tmp_path / "exports" / "deleted"
    assert wb("export", batch, "--format", "hf", "-o", deleted).code == 0
    assert (deleted / "manifest.yaml").read_text(encoding="utf-8") == body

    # A batch stored before its text was kept: the file when readable, else not included.
    _sqlite(tmp_path, f"UPDATE batches SET manifest_text = NULL WHERE id = '{batch}'")
    missing = tmp_path / "exports" / "missing"
    export = wb("export", batch, "--format", "hf", "-o", missing, "--json")
    assert export.code == 0, export.stderr
    assert (export.json()["manifest"], export.json()["manifest_source"]) == (None, None)
    card = (missing / "README.md").read_text()
    assert "- manifest: not included (`hf-card-path.yaml` was not readable at export time)" in card
    assert str(tmp_path) not in card
    path.write_text(body, encoding="utf-8")
    from_file = tmp_path / "exports" / "from-file"
    export = wb("export", batch, "--format", "hf", "-o", from_file, "--json")
    assert (export.json()["manifest_source"], export.json()["manifest_changed"]) == ("file", False)
    assert (
        "- manifest: `manifest.yaml` (copied from `hf-card-path.yaml`)"
        in (from_file / "README.md").read_text()
    )


def _card_lines(folder: Path) -> list[str]:
    return (folder / "README.md").read_text(encoding="utf-8").splitlines()


def test_hf_card_of_a_rerun_names_its_parent_and_the_rerun_command(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """A rerun batch was not made by ``wanbatch run <manifest>``: its card names the parent batch
    and the ``rerun`` command with the options given, and its ``manifest.yaml`` is the text the
    parent was made from (stored), not what the manifest file holds by the time of the export."""
    body = TWO_JOBS.format(name="card-parent")
    path = manifest("card-parent", body)
    parent = processed(wb, "run", path)["batch"]
    path.write_text(body.replace("Clouds drifting", "Edited after the run"), encoding="utf-8")
    rerun = processed(
        wb, "rerun", "card-parent", "--new-seeds", "--max-usd", "5", "--vary", "resolution=480p,720p"
    )
    child = rerun["batch"]
    assert rerun["total"] == 4

    folder = tmp_path / "exports" / "rerun"
    assert wb("export", child, "--format", "hf", "-o", folder).code == 0
    lines = _card_lines(folder)
    assert f"- rerun of: batch `card-parent` (`{parent}`)" in lines
    assert (
        f"- generated: `wanbatch rerun {parent} --new-seeds --max-usd 5 --vary resolution=480p,720p`" in lines
    )
    assert not [line for line in lines if "wanbatch run" in line]
    assert (
        "- manifest: `manifest.yaml` (the text of `card-parent.yaml` its parent batch was made from, "
        "as stored with it)" in lines
    )
    assert (folder / "manifest.yaml").read_text(encoding="utf-8") == body

    # The parent's card still says `run`; a plain rerun's command has no options.
    parent_folder = tmp_path / "exports" / "parent"
    assert wb("export", parent, "--format", "hf", "-o", parent_folder).code == 0
    assert "- generated: `wanbatch run <manifest>`" in _card_lines(parent_folder)
    assert not [line for line in _card_lines(parent_folder) if line.startswith("- rerun of:")]
    again = processed(wb, "rerun", parent)["batch"]
    plain_folder = tmp_path / "exports" / "plain"
    assert wb("export", again, "--format", "hf", "-o", plain_folder).code == 0
    assert f"- generated: `wanbatch rerun {parent}`" in _card_lines(plain_folder)

    # A rerun stored before its options were kept says so, not a command it cannot know.
    _sqlite(tmp_path, f"UPDATE batches SET rerun_options = NULL WHERE id = '{child}'")
    old = tmp_path / "exports" / "old"
    assert wb("export", child, "--format", "hf", "-o", old).code == 0
    (generated,) = [line for line in _card_lines(old) if line.startswith("- generated:")]
    assert generated.startswith(f"- generated: `wanbatch rerun {parent}` with options that were not recorded")
    assert f"- rerun of: batch `card-parent` (`{parent}`)" in _card_lines(old)


#: Thirty jobs of $0.2025 each (wan-22 at 480p, 5.0625 s): $6.075 exactly, $6.08 rounded half up.
#: Added as floats, the thirty land just under the half cent (6.074999…) and the card said $6.07.
THIRTY_AT_HALF_CENTS = """\
name: {name}
endpoint: fal-ai/wan-22
defaults:
  resolution: 480p
matrix:
  seed: [{seeds}]
items:
  - prompt: a fox in the snow
"""


def test_hf_card_cost_is_the_exact_sum_that_cost_reports(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The card's cost is summed exactly and rounded like ``cost``'s: the same cent, not a float's."""
    body = THIRTY_AT_HALF_CENTS.format(name="card30", seeds=", ".join(str(i) for i in range(1, 31)))
    run = wb("run", manifest("card30", body), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]
    cost = wb("cost", batch, "--json")
    assert cost.code == 0, cost.stderr
    total = cost.json()["total"]
    assert total["actual_usd"] == 6.075  # the case float addition rounds the wrong way
    # Added one by one as floats (as `sum` did before CPython 3.12, which now compensates):
    added = functools.reduce(operator.add, (float(r["cost_usd"]) for r in export_jsonl(wb, batch)), 0.0)
    assert added < 6.075

    folder = tmp_path / "exports" / "card30"
    assert wb("export", batch, "--format", "hf", "-o", folder).code == 0
    card = (folder / "README.md").read_text()
    assert "- cost of these rows: $6.08 (billing units: 151.875 s)" in card
    assert "- billed for the whole batch: $6.08 (billing units: 151.875 s), every job included" in card


#: One pinned-seed job per seed listed: a batch with ``reuse_outputs`` takes the video of an
#: earlier batch's job with the same seed instead of sending its own.
SEEDED = """\
name: {name}
endpoint: fal-ai/wan-i2v
reuse_outputs: {reuse}
defaults:
  resolution: 480p
  image_url: images/landscape.jpg
matrix:
  seed: [{seeds}]
items:
  - prompt: a lighthouse at dusk
"""


def _status_lines_add_up(lines: list[str]) -> None:
    """The card's top-level counts (``- succeeded: 3``, …) add up to its rows; what some of a
    status's rows are besides is nested under it, never counted twice."""
    (rows,) = [int(line.split()[1]) for line in lines if line.startswith("- ") and "row(s) in" in line]
    counted = [line for line in lines if re.fullmatch(r"- (succeeded|failed|cancelled): \d+", line)]
    assert sum(int(line.rsplit(" ", 1)[1]) for line in counted) == rows


def test_hf_card_counts_reused_videos_and_names_their_batches(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Export audit (session 34): a batch whose videos came from other batches (``reuse_outputs``)
    had a card that said they were generated for it, cost $0.00, and never named where they came
    from. The card counts them (under their status, so the counts still add up to the rows) and
    names the source batches, the first few by name and then how many more."""
    first = processed(wb, "run", manifest("src-a", SEEDED.format(name="src-a", reuse="false", seeds="1, 2")))
    second = processed(wb, "run", manifest("src-b", SEEDED.format(name="src-b", reuse="false", seeds="3")))
    third = processed(wb, "run", manifest("src-c", SEEDED.format(name="src-c", reuse="false", seeds="4")))
    body = SEEDED.format(name="takes", reuse="true", seeds="1, 2, 3, 4, 5")
    takes = processed(wb, "run", manifest("takes", body))
    assert sum(r["reused_from"] is not None for r in export_jsonl(wb, takes["batch"])) == 4

    folder = tmp_path / "exports" / "takes"
    done = wb("export", takes["batch"], "--format", "hf", "-o", folder, "--json")
    assert done.code == 0, done.stderr
    lines = _card_lines(folder)
    _status_lines_add_up(lines)
    at = lines.index("- succeeded: 5")
    assert lines[at + 1] == "  - of them, took a video another job made (`reused_from`): 4"
    (reused,) = [line for line in lines if line.startswith("**Reused videos:**")]
    assert reused.startswith(
        "**Reused videos:** 4 of these rows took a video another job made instead of being sent"
    )
    assert (
        f"`reused_from` names that job): 2 from batch `src-a` (`{first['batch']}`), "
        f"1 from batch `src-b` (`{second['batch']}`), 1 from batch `src-c` (`{third['batch']}`). "
    ) in reused
    assert "counted in the batch that made them" in reused
    assert done.json()["reused"] == {
        "records": 4,
        "by_status": {"succeeded": 4},
        "sources": [
            {"batch": first["batch"], "name": "src-a", "records": 2},
            {"batch": second["batch"], "name": "src-b", "records": 1},
            {"batch": third["batch"], "name": "src-c", "records": 1},
        ],
    }

    # More source batches than the card names: the rest are counted, not listed.
    monkeypatch.setattr(dataset_export, "CARD_SOURCES", 1)
    fewer = tmp_path / "exports" / "fewer"
    assert wb("export", takes["batch"], "--format", "hf", "-o", fewer).code == 0
    (reused,) = [line for line in _card_lines(fewer) if line.startswith("**Reused videos:**")]
    assert f"2 from batch `src-a` (`{first['batch']}`), and 2 from 2 more batch(es). " in reused


def test_hf_card_counts_videos_not_as_requested_as_status_does(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Export audit (session 34): ``status`` said "1 video(s) not as requested" and the card of the
    same batch said nothing. It counts the rows whose ``media_mismatch`` is set (nested under
    their status), and says when ``status`` counts more in the whole batch than the dataset holds."""
    sim.set_faults(bad_render={"next": 1, "frames": 33})
    flagged = processed(wb, "run", manifest("flagged", TWO_JOBS.format(name="flagged")))["batch"]
    assert wb("status", flagged, "--json").json()["media_mismatches"] == 1
    folder = tmp_path / "exports" / "flagged"
    done = wb("export", flagged, "--format", "hf", "-o", folder, "--json")
    assert done.code == 0, done.stderr
    assert (done.json()["media_mismatches"], done.json()["batch_media_mismatches"]) == (1, 1)
    lines = _card_lines(folder)
    _status_lines_add_up(lines)
    assert "  - of them, with a video not as requested (`media_mismatch`): 1" in lines
    assert (
        "**Videos not as requested:** 1 of these rows (`media_mismatch` says what differs from the "
        "request: size, frames, duration, …)."
    ) in lines

    # Failed for it (WANBATCH_MEDIA_MISMATCH=fail): not a row unless --include failed, and said so.
    monkeypatch.setenv("WANBATCH_MEDIA_MISMATCH", "fail")
    sim.set_faults(bad_render={"next": 1, "size": [320, 240]})
    run = wb("run", manifest("strict", TWO_JOBS.format(name="strict")), "--json", "--no-progress")
    strict = run.json()["batch"]
    assert wb("status", strict, "--json").json()["media_mismatches"] == 1
    folder = tmp_path / "exports" / "strict"
    assert wb("export", strict, "--format", "hf", "-o", folder).code == 0
    assert (
        "**Videos not as requested:** 0 of these rows (`media_mismatch` says what differs from the "
        "request: size, frames, duration, …); `wanbatch status` counts 1 video(s) not as requested "
        "in the whole batch, 1 of them in jobs not exported."
    ) in _card_lines(folder)
    every = tmp_path / "exports" / "strict-all"
    assert wb("export", strict, "--format", "hf", "-o", every, "--include", "failed").code == 0
    lines = _card_lines(every)
    _status_lines_add_up(lines)
    assert (
        lines[lines.index("- failed: 1") + 1]
        == "  - of them, with a video not as requested (`media_mismatch`): 1"
    )
    assert "**Videos not as requested:** 1 of these rows" in "\n".join(lines)
