"""Parquet and Hugging Face exports of a simulated batch (issue #13), read back by their own tools.

The Hugging Face folder is loaded with ``datasets.load_dataset("json", ...)`` as a user would,
and every video it names is checked against its recorded SHA-256; the Parquet file is read with
pyarrow and must hold exactly the JSONL export's rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq
import pytest

from falsim.server import SimulatorHandle
from jobs.dataset_export import arrow_schema, metadata_row
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


#: The fields only an hf export's metadata.jsonl has: the video and the input files in the folder.
_HF_ONLY = ("file_name", "input_files", "input_file_problems")

#: The fields Parquet holds as JSON text (objects and lists in the JSONL export).
_JSON_TEXT = ("input", "media", "source_files", "provider_metrics", "provider_output")


def _as_jsonl(row: dict[str, Any]) -> dict[str, Any]:
    """A Parquet row in the JSONL export's terms: JSON text back to objects, timestamps to ISO."""
    out: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, str) and name in _JSON_TEXT and value[:1] in "{[":
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
    for line in lines:  # every export field as the JSONL export has it, but video_path: the
        # copy inside the dataset (file_name), never the stored output's path on this machine;
        # objects are JSON text and timestamps have microseconds (metadata_row)
        assert line["video_path"] == line["file_name"]
        assert {k: v for k, v in line.items() if k not in _HF_ONLY} == metadata_row(
            {**by_id[line["job_id"]], "video_path": line["file_name"]}
        )
        # the local images sent, inside the dataset (the text-to-video job has none)
        sources = by_id[line["job_id"]]["source_files"] or {}
        local = {f for f, s in sources.items() if not s["source"].startswith(("http:", "https:"))}
        named = json.loads(line["input_files"]) if line["input_files"] else {}
        assert set(named) == local
        for fld, path in named.items():
            assert _sha256(folder / path) == sources[fld]["sha256"]
        assert json.loads(line["input"]) == by_id[line["job_id"]]["input"]
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
    assert run.code == 2  # nothing written: not exit 1, which says jobs failed
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
    assert run.code == 2
    assert ("replaced by a link" if tamper == "symlink" else "has 1,000 bytes instead of") in run.stderr
    assert not exports.exists()


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """The process's umask for the test (the CLI runs in process), restored afterwards."""
    mask: int = request.param
    before = os.umask(mask)
    try:
        yield mask
    finally:
        os.umask(before)


def _modes(folder: Path) -> dict[str, int]:
    """Permission bits of everything under ``folder``, by path relative to it."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.lstat().st_mode) for p in sorted(folder.rglob("*"))}


ONE_EACH = """\
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


def test_stored_outputs_and_the_hf_dataset_get_the_users_usual_modes(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, umask: int
) -> None:
    """Videos and sidecars were written through ``mkstemp`` (0600) and kept that mode, so an
    ``hf`` export, which hard-links the videos, had world-readable metadata and folders but
    owner-only videos: the dataset's readers could open everything but the videos."""
    files, folders = 0o666 & ~umask, 0o777 & ~umask
    run = wb("run", manifest("modes", ONE_EACH.format(name="modes")), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]
    outputs = tmp_path / "outputs"
    stored = {name: mode for name, mode in _modes(outputs).items() if (outputs / name).is_file()}
    assert sorted(Path(name).suffix for name in stored) == [".json", ".json", ".mp4", ".mp4"]
    assert stored == dict.fromkeys(stored, files)

    folder = tmp_path / "exports" / "hf"
    export = wb("export", batch, "--format", "hf", "-o", folder, "--json")
    assert export.code == 0, export.stderr
    assert export.json()["hard_linked"] == 2
    modes = _modes(folder)
    assert {Path(name).suffix for name in modes} == {"", ".jsonl", ".md", ".yaml", ".mp4"}
    for name, mode in modes.items():
        assert mode == (folders if (folder / name).is_dir() else files), (name, oct(mode))
    assert stat.S_IMODE(folder.stat().st_mode) == folders

    # An output stored by an earlier wanbatch (owner-only) is copied with the usual mode, not
    # linked: the dataset stays readable, and the stored output is left as it was.
    old = next(outputs / name for name in stored if name.endswith(".mp4"))
    old.chmod(0o600)
    again = tmp_path / "exports" / "again"
    export = wb("export", batch, "--format", "hf", "-o", again, "--json")
    assert export.code == 0, export.stderr
    linked = 2 if umask == 0o077 else 1  # under 077 owner-only is the usual mode: still linked
    assert (export.json()["hard_linked"], export.json()["copied"]) == (linked, 2 - linked)
    assert {mode for name, mode in _modes(again / "videos").items()} == {files}
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_every_export_format_names_the_media_duration_as_the_contract_does(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    """The contract's ``media`` is "the probed width, height, frames, fps, duration": the
    exports had ``duration_s`` only, and ``rec["media"]["duration"]`` was a KeyError. Jobs keep
    ``duration_s`` in the database (older rows have nothing else): the export maps it."""
    run = wb("run", manifest("media-keys", ONE_EACH.format(name="media-keys")), "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]
    contract = {"width", "height", "frames", "fps", "duration"}

    def check(media: dict[str, Any]) -> None:
        assert contract <= media.keys(), media
        assert media["duration"] == media["duration_s"] == pytest.approx(5.06, abs=0.01)
        assert (media["width"], media["height"], media["frames"]) == (854, 480, 81)

    records = export_jsonl(wb, batch)
    assert len(records) == 2
    for record in records:
        check(record["media"])
    csv_out = wb("export", batch, "--format", "csv")
    assert csv_out.code == 0, csv_out.stderr
    for row in csv.DictReader(io.StringIO(csv_out.stdout)):
        check(json.loads(row["media"]))
    target = tmp_path / "media.parquet"
    assert wb("export", batch, "--format", "parquet", "-o", target).code == 0
    table = pq.read_table(target)
    assert str(table.schema.field("media").type) == "string"  # JSON text
    for text in table.column("media").to_pylist():
        check(json.loads(text))
    folder = tmp_path / "hf"
    assert wb("export", batch, "--format", "hf", "-o", folder).code == 0
    for line in (folder / "metadata.jsonl").read_text().splitlines():
        check(json.loads(json.loads(line)["media"]))  # JSON text, as in Parquet
