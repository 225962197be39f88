"""Variants, source files and provenance end to end: manifest → stored → exported (simulator)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from falsim.server import SimulatorHandle
from jobs.endpoints import registry_sha256
from tests.e2e.e2e_helpers import MakeManifest, Wb, db_rows, export_jsonl

URL = "https://example.com/cat.png"
BODY = """\
name: sweep
endpoint: fal-ai/wan-i2v
defaults:
  num_frames: 81
matrix:
  resolution: [480p, 720p]
  seed: [1, 2]
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
  - prompt: Night falls over the hills
    image_url: images/night.jpg
"""


@pytest.mark.slow
def test_variants_source_files_and_provenance_reach_the_export(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("sweep", BODY)
    done = wb("run", path, "--json", "--no-progress")
    assert done.code == 0, done.stderr
    batch = str(done.json()["batch"])

    records = export_jsonl(wb, batch)
    assert [(r["item_index"], r["variant"]) for r in records] == [(i, v) for i in (0, 1) for v in range(4)]
    assert [r["input"]["resolution"] for r in records[:4]] == ["480p", "480p", "720p", "720p"]
    assert [r["input"]["seed"] for r in records[:4]] == [1, 2, 1, 2]
    images = path.parent / "images"
    for r in records:
        name = "landscape.jpg" if r["item_index"] == 0 else "night.jpg"
        digest = hashlib.sha256((images / name).read_bytes()).hexdigest()
        assert r["source_files"] == {"image_url": {"source": f"images/{name}", "sha256": digest}}
        assert r["registry_sha256"] == registry_sha256("fal-ai/wan-i2v")
        assert r["status"] == "succeeded"

    url = os.environ["WANBATCH_DATABASE_URL"]
    [(text, digest)] = db_rows(url, "SELECT manifest_text, manifest_sha256 FROM batches")
    assert text == BODY
    assert digest == hashlib.sha256(BODY.encode()).hexdigest()
    tables = {row[0] for row in db_rows(url, "SELECT price_table FROM jobs")}
    assert len(tables) == 1
    price = json.loads(tables.pop())
    assert price["usd_per_unit"] == "0.40"
    assert price["factors"][0]["table"] == {"480p": "0.5", "720p": "1"}

    parquet = tmp_path / "sweep.parquet"
    assert wb("export", batch, "--format", "parquet", "-o", parquet).code == 0
    table = pq.read_table(parquet)
    assert str(table.schema.field("variant").type) == "int64"
    assert table.column("variant").to_pylist() == [r["variant"] for r in records]
    assert [json.loads(s) for s in table.column("source_files").to_pylist()] == [
        r["source_files"] for r in records
    ]

    # A re-submit of the edited manifest keeps the batch's newest text (and adds the new item).
    edited = BODY + f"  - prompt: A cat on a sofa\n    image_url: {URL}\n"
    path.write_text(edited, encoding="utf-8")
    again = wb("submit", path, "--json")
    assert again.code == 0, again.stderr
    assert again.json()["added"] == 4
    [(text, digest)] = db_rows(url, "SELECT manifest_text, manifest_sha256 FROM batches")
    assert (text, digest) == (edited, hashlib.sha256(edited.encode()).hexdigest())
    added = export_jsonl(wb, batch)[8:]
    assert [r["source_files"] for r in added] == [{"image_url": {"source": URL, "sha256": None}}] * 4


def test_a_job_never_sent_exports_its_images_as_the_manifest_named_them(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    from tests.e2e.e2e_helpers import TWO_JOBS

    path = manifest("unsent", TWO_JOBS.format(name="unsent"))
    assert wb("submit", path).code == 0
    assert wb("cancel", "unsent", "--no-progress").code in (0, 1)

    records = export_jsonl(wb, "unsent")

    assert [r["status"] for r in records] == ["cancelled", "cancelled"]
    assert [r["input"]["image_url"] for r in records] == ["images/landscape.jpg", "images/night.jpg"]
    assert all(str(path.parent) not in json.dumps(r) for r in records)  # no absolute path of ours
    assert records[0]["input"]["prompt"] == "Clouds drifting past the peak"


@pytest.mark.slow
def test_a_default_image_is_the_manifests_file_for_items_from_rows(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """``defaults: {image_url: images/landscape.jpg}`` names the manifest's file for the rows of
    ``data/rows.jsonl`` too, never a ``data/images/landscape.jpg`` beside them: the export's
    ``source_files`` says which bytes were sent, and both jobs sent the manifest's image."""
    path = manifest(
        "dfl",
        "name: dfl\nendpoint: fal-ai/wan-i2v\n"
        "defaults: {resolution: 480p, image_url: images/landscape.jpg}\n"
        "items:\n  - prompt: the item\nitems_from: data/rows.jsonl\n",
    )
    data = path.parent / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(path.parent / "images" / "night.jpg", data / "images" / "landscape.jpg")  # the decoy
    (data / "rows.jsonl").write_text(json.dumps({"prompt": "the row"}) + "\n")
    done = wb("run", path, "--json", "--no-progress")
    assert done.code == 0, done.stderr

    records = export_jsonl(wb, str(done.json()["batch"]))
    digest = hashlib.sha256((path.parent / "images" / "landscape.jpg").read_bytes()).hexdigest()
    assert [r["input"]["prompt"] for r in records] == ["the item", "the row"]
    for r in records:
        assert r["source_files"] == {"image_url": {"source": "images/landscape.jpg", "sha256": digest}}
