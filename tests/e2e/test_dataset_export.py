"""Parquet and Hugging Face exports of a simulated batch (issue #13), read back by their own tools.

The Hugging Face folder is loaded with ``datasets.load_dataset("json", ...)`` as a user would,
and every video it names is checked against its recorded SHA-256; the Parquet file is read with
pyarrow and must hold exactly the JSONL export's rows.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import pytest

from falsim.server import SimulatorHandle
from jobs.dataset_export import arrow_schema
from tests.e2e.e2e_helpers import MakeManifest, Wb, export_jsonl

#: Three endpoints (different input keys) and one job the provider fails for good (a 422: it
#: cannot fetch ``{missing}``, a file on the simulator's own storage host that does not exist).
MIXED = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 1
  - endpoint: fal-ai/wan-22
    prompt: A paper boat on a rainy street
    seed: 2
  - endpoint: fal-ai/wan-flf2v
    prompt: Day turns to night
    start_image_url: images/landscape.jpg
    end_image_url: images/night.jpg
    seed: 3
  - prompt: the provider cannot fetch this image
    image_url: {missing}
    seed: 4
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run_batch(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, name: str) -> tuple[str, int]:
    """Run the mixed batch with one permanent failure; (batch id, succeeded count)."""
    body = MIXED.format(name=name, missing=f"{sim.url}/files/nope/missing.png")
    run = wb("run", manifest(name, body), "--json", "--no-progress")
    report = run.json()
    assert report["counts"]["failed"] == 1, run.stderr
    return report["batch"], report["counts"]["succeeded"]


def _as_jsonl(row: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row in the JSONL export's terms: JSON text back to objects, timestamps to ISO."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, str) and name in ("input", "media", "source_files") and value[:1] in "{[":
            value = json.loads(value)
        out[name] = value
    return out


@pytest.mark.slow
def test_hf_folder_loads_with_datasets_and_parquet_equals_jsonl(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    batch, succeeded = _run_batch(wb, sim, manifest, "ds-export")
    assert succeeded == 3
    jsonl = export_jsonl(wb, batch)
    assert len(jsonl) == 4

    # Hugging Face folder: one row per succeeded job, every file_name present with its SHA-256.
    folder = tmp_path / "exports" / "hf"
    run = wb("export", batch, "--format", "hf", "-o", folder)
    assert run.code == 0, run.stderr
    ds = datasets.load_dataset(
        "json", data_files=str(folder / "metadata.jsonl"), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert ds.num_rows == succeeded
    by_id = {r["job_id"]: r for r in jsonl}
    for row in ds:
        video = folder / row["file_name"]
        assert video.is_file()
        assert video.resolve().is_relative_to(folder.resolve())
        assert _sha256(video) == row["video_sha256"] == by_id[row["job_id"]]["video_sha256"]
        assert row["status"] == "succeeded"
    lines = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    for line in lines:  # every export field, exactly as the JSONL export has it
        assert {k: v for k, v in line.items() if k != "file_name"} == by_id[line["job_id"]]
    assert (folder / "manifest.yaml").read_text().startswith("name: ds-export")
    card = (folder / "README.md").read_text()
    assert "succeeded: 3" in card
    assert "fal-ai/wan-flf2v" in card
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".part")]

    # --include failed: the failed job too, without a file_name; a non-empty target is refused.
    assert wb("export", batch, "--format", "hf", "-o", folder).code == 2
    full = tmp_path / "exports" / "hf-all"
    assert wb("export", batch, "--format", "hf", "-o", full, "--include", "failed").code == 0
    all_rows = [json.loads(x) for x in (full / "metadata.jsonl").read_text().splitlines()]
    assert len(all_rows) == 4
    (failed,) = [r for r in all_rows if r["status"] == "failed"]
    assert failed["file_name"] is None
    assert failed["error"]

    # Parquet: typed columns, and the same rows as the JSONL export.
    target = tmp_path / "exports" / "batch.parquet"
    assert wb("export", batch, "--format", "parquet", "-o", target).code == 0
    table = pq.read_table(target)
    assert table.schema.equals(arrow_schema())
    assert str(table.schema.field("cost_usd").type) == "double"
    assert str(table.schema.field("seed").type) == "uint64"
    assert [_as_jsonl(r) for r in table.to_pylist()] == jsonl


def test_hf_export_needs_a_folder_and_leaves_nothing_on_failure(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    batch, _ = _run_batch(wb, sim, manifest, "ds-missing")
    assert wb("export", batch, "--format", "hf").code == 2  # no -o DIR
    for record in export_jsonl(wb, batch):
        if record["status"] == "succeeded":
            (tmp_path / "outputs" / record["video_path"]).unlink()
            break
    exports = tmp_path / "exports"
    run = wb("export", batch, "--format", "hf", "-o", exports / "hf")
    assert run.code == 1
    assert "missing" in run.stderr
    # No half folder, no temp left behind, and not the folder the export made for -o either.
    assert not exports.exists()


@pytest.mark.parametrize("tamper", ["symlink", "truncated"])
def test_hf_export_refuses_a_video_replaced_since_it_was_stored(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, tamper: str
) -> None:
    """A symlink in a stored video's place (to a secret, say) would put that file into a dataset
    meant to be shared; a video of another size is not the one the job made."""
    batch, _ = _run_batch(wb, sim, manifest, f"ds-{tamper}")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the dataset")
    video = next(
        tmp_path / "outputs" / r["video_path"] for r in export_jsonl(wb, batch) if r["status"] == "succeeded"
    )
    if tamper == "symlink":
        video.unlink()
        video.symlink_to(secret)
    else:
        video.write_bytes(video.read_bytes()[:1000])
    exports = tmp_path / "exports"
    run = wb("export", batch, "--format", "hf", "-o", exports / "hf")
    assert run.code == 1
    assert ("replaced by a link" if tamper == "symlink" else "has 1,000 bytes instead of") in run.stderr
    assert not exports.exists()
