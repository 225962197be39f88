"""The Hugging Face export as its loaders read it, without needing ``datasets`` installed.

``datasets.load_dataset("json", ...)`` and ``"videofolder"`` read ``metadata.jsonl`` with
pyarrow's JSON reader, which makes a column of numbers float64 as soon as one exceeds int64: a
seed of 2**64 - 1 came back as 1.8446744073709552e+19 and could no longer reproduce its video.
``seed_text`` (the seed as decimal text) is what those loaders read exactly; reading the file
with ``pyarrow.json`` here pins that, as ``datasets`` itself would read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.json as paj

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

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


def test_hf_card_names_the_manifest_without_its_local_folder(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The card is the file meant to be published: the manifest's absolute path (a home
    directory, a user name) must not be in it, whether the manifest was copied or not."""
    path = manifest("hf-card-path", BIG_SEEDS.format(name="hf-card-path"))
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]

    copied = tmp_path / "exports" / "copied"
    assert wb("export", batch, "--format", "hf", "-o", copied).code == 0
    card = (copied / "README.md").read_text()
    assert "- manifest: `manifest.yaml` (copied from `hf-card-path.yaml`)" in card
    assert str(path.parent) not in card
    assert str(tmp_path) not in card

    path.unlink()
    missing = tmp_path / "exports" / "missing"
    assert wb("export", batch, "--format", "hf", "-o", missing).code == 0
    card = (missing / "README.md").read_text()
    assert "- manifest: not included (`hf-card-path.yaml` was not readable at export time)" in card
    assert str(tmp_path) not in card


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
    assert sum(r["cost_usd"] for r in export_jsonl(wb, batch)) < 6.075

    folder = tmp_path / "exports" / "card30"
    assert wb("export", batch, "--format", "hf", "-o", folder).code == 0
    card = (folder / "README.md").read_text()
    assert "- cost: $6.08 (billing units: 151.875 s)" in card
