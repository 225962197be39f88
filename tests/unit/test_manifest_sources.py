"""Expansion provenance: each matrix job's ``variant``, ``source_files``, the registry entry's hash,
and ``diff``'s third pass (item and variant)."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from jobs.diff import JobSide, Pair, match
from jobs.endpoints import get_endpoint, registry_sha256
from jobs.endpoints.registry import _DATA_DIR
from jobs.errors import Issue
from jobs.manifest import JobSpec, load_manifest, validate_manifest
from jobs.manifest.sources import data_uri_sha256

URL = "https://example.com/cat.png"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (480, 480), (100, 150, 200)).save(tmp_path / "images" / "a.png")
    return tmp_path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jobs_of(folder: Path, text: str) -> list[JobSpec]:
    path = folder / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return list(load_manifest(path).jobs())


def test_every_matrix_job_of_an_item_gets_its_own_variant(folder: Path) -> None:
    jobs = jobs_of(
        folder,
        f"""\
name: v
endpoint: fal-ai/wan-i2v
matrix:
  resolution: [480p, 720p]
  seed: [1, 2]
items:
  - {{prompt: one, image_url: {URL}}}
  - {{prompt: two, image_url: {URL}}}
""",
    )
    assert [(j.item_index, j.variant) for j in jobs] == [(i, v) for i in (0, 1) for v in range(4)]
    # The variant is the combination's index: the same combination has the same index per item.
    assert [j.matrix for j in jobs[:4]] == [j.matrix for j in jobs[4:]]


def test_items_without_a_matrix_are_variant_0(folder: Path) -> None:
    jobs = jobs_of(
        folder, f"name: v\nendpoint: fal-ai/wan-i2v\nitems:\n  - {{prompt: a, image_url: {URL}}}\n"
    )
    assert [j.variant for j in jobs] == [0]


def test_source_files_name_each_media_field_as_written_with_its_hash(folder: Path) -> None:
    png = (folder / "images" / "a.png").read_bytes()
    data_uri = "data:image/png;base64," + base64.b64encode(png).decode()
    jobs = jobs_of(
        folder,
        f"""\
name: s
endpoint: fal-ai/wan-flf2v
defaults:
  start_image_url: images/a.png
items:
  - {{prompt: local and url, end_image_url: {URL}}}
  - {{prompt: data uri, end_image_url: "{data_uri}"}}
  - endpoint: fal-ai/wan-22
    prompt: no media field
""",
    )
    local = {"source": "images/a.png", "sha256": sha(folder / "images" / "a.png")}
    assert jobs[0].source_files == {
        "start_image_url": local,
        "end_image_url": {"source": URL, "sha256": None},  # never fetched
    }
    assert jobs[0].input["start_image_url"] == str((folder / "images" / "a.png").resolve())
    assert jobs[1].source_files is not None
    assert jobs[1].source_files["end_image_url"] == {
        "source": data_uri,
        "sha256": hashlib.sha256(png).hexdigest(),
    }
    assert jobs[2].source_files is None


def test_items_from_rows_name_paths_relative_to_their_file(folder: Path) -> None:
    rows = folder / "rows"
    rows.mkdir()
    Image.new("RGB", (500, 400), (1, 2, 3)).save(rows / "b.png")
    (rows / "items.jsonl").write_text(json.dumps({"prompt": "row", "image_url": "b.png"}) + "\n")
    jobs = jobs_of(folder, "name: r\nendpoint: fal-ai/wan-i2v\nitems_from: rows/items.jsonl\n")
    assert jobs[0].source_files == {"image_url": {"source": "b.png", "sha256": sha(rows / "b.png")}}


def _decoy_rows(folder: Path, *rows: dict[str, str]) -> Path:
    """``data/rows.jsonl`` beside ``data/images/a.png``: another image of the same relative name
    as the manifest's ``images/a.png``, which a manifest value must never resolve to."""
    (folder / "data" / "images").mkdir(parents=True)
    Image.new("RGB", (480, 480), (9, 9, 9)).save(folder / "data" / "images" / "a.png")
    rows_file = folder / "data" / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows_file


def test_defaults_resolve_from_the_manifest_folder_in_items_from_rows(folder: Path) -> None:
    """A default is written in the manifest: ``images/a.png`` is the manifest's file for every
    item, never ``data/images/a.png`` for the rows of ``data/rows.jsonl``; a row's own value
    still resolves from its file's folder."""
    _decoy_rows(folder, {"prompt": "default image"}, {"prompt": "own image", "image_url": "images/a.png"})
    jobs = jobs_of(
        folder,
        "name: d\nendpoint: fal-ai/wan-i2v\ndefaults: {image_url: images/a.png}\n"
        "items:\n  - prompt: item\nitems_from: data/rows.jsonl\n",
    )
    mine, decoy = folder / "images" / "a.png", folder / "data" / "images" / "a.png"
    assert [j.input["image_url"] for j in jobs] == [str(mine), str(mine), str(decoy)]
    assert [j.source_files for j in jobs] == [
        {"image_url": {"source": "images/a.png", "sha256": sha(path)}} for path in (mine, mine, decoy)
    ]


def test_matrix_values_resolve_from_the_manifest_folder_in_items_from_rows(folder: Path) -> None:
    """A matrix value overrides the row's own (with a warning) and is the manifest's file."""
    _decoy_rows(folder, {"prompt": "row", "image_url": "images/a.png"})
    path = folder / "m.yaml"
    path.write_text(
        "name: d\nendpoint: fal-ai/wan-i2v\nmatrix: {image_url: [images/a.png]}\n"
        "items_from: data/rows.jsonl\n"
    )
    issues: list[Issue] = []
    (job,) = load_manifest(path).jobs(issues)
    mine = folder / "images" / "a.png"
    assert job.input["image_url"] == str(mine)
    assert job.source_files == {"image_url": {"source": "images/a.png", "sha256": sha(mine)}}
    assert [i.severity for i in issues] == ["warning"]  # the matrix overrides the row's value


def test_a_default_only_in_the_manifest_folder_is_found_for_items_from_rows(folder: Path) -> None:
    """Without a decoy the default was looked for in the data file's folder: "file not found"
    at the manifest's line for a file that is there."""
    rows = folder / "data"
    rows.mkdir()
    (rows / "rows.jsonl").write_text(json.dumps({"prompt": "row"}) + "\n")
    path = folder / "m.yaml"
    path.write_text(
        "name: d\nendpoint: fal-ai/wan-i2v\ndefaults: {resolution: 480p, image_url: images/a.png}\n"
        "items_from: data/rows.jsonl\n"
    )
    report = validate_manifest(path)
    assert report.ok, [str(i) for i in report.issues]


def test_a_missing_file_has_no_hash(folder: Path) -> None:
    jobs = jobs_of(
        folder, "name: m\nendpoint: fal-ai/wan-i2v\nitems:\n  - {prompt: a, image_url: gone.png}\n"
    )
    assert jobs[0].source_files == {"image_url": {"source": "gone.png", "sha256": None}}


def test_data_uri_hash_is_of_the_decoded_bytes() -> None:
    assert data_uri_sha256("data:image/png;base64," + base64.b64encode(b"xyz").decode()) == (
        hashlib.sha256(b"xyz").hexdigest()
    )
    assert data_uri_sha256("data:image/png,not-base64") is None
    assert data_uri_sha256("data:image/png;base64,@@@") is None


def test_registry_sha256_is_the_hash_of_the_endpoint_file() -> None:
    files = {p: p.read_bytes() for p in _DATA_DIR.glob("*.yaml")}
    digest = registry_sha256("fal-ai/wan-i2v")
    assert digest in {hashlib.sha256(data).hexdigest() for data in files.values()}
    assert len({registry_sha256(e) for e in ("fal-ai/wan-i2v", "fal-ai/wan-flf2v")}) == 2
    assert get_endpoint("fal-ai/wan-i2v").id == "fal-ai/wan-i2v"


def side(job_id: str, item: int, variant: int, prompt: str) -> JobSide:
    return JobSide(
        job_id=job_id,
        job_key=job_id,
        item_index=item,
        variant=variant,
        endpoint="fal-ai/wan-i2v",
        status="succeeded",
        seed=None,
        prompt=prompt,
        video_sha256=job_id,
        cost_usd=None,
        unseeded=prompt,
    )


def test_diff_pairs_changed_jobs_by_item_and_variant_only_for_the_same_manifest() -> None:
    a = [side("a0", 0, 0, "x"), side("a1", 0, 1, "y")]
    b = [side("b1", 0, 1, "y2"), side("b0", 0, 0, "x2")]  # every prompt edited
    pairs = match(a, b)
    assert [(p.a and p.a.job_id, p.b and p.b.job_id, p.matched_by) for p in pairs] == [
        ("a0", "b0", "item"),
        ("a1", "b1", "item"),
    ]
    assert [p.outcome for p in match(a, b, by_place=False)] == ["only_a", "only_a", "only_b", "only_b"]


def test_diff_never_pairs_jobs_of_different_endpoints_by_place_and_names_the_endpoint() -> None:
    from dataclasses import replace

    a = [side("a0", 0, 0, "x"), side("a1", 1, 0, "y")]
    b = [replace(side("b0", 0, 0, "x2"), endpoint="fal-ai/wan-22"), side("b1", 1, 0, "y2")]
    pairs = match(a, b)
    assert [(p.a and p.a.job_id, p.b and p.b.job_id, p.matched_by) for p in pairs] == [
        ("a0", None, None),
        ("a1", "b1", "item"),
        (None, "b0", None),
    ]
    assert "endpoint" not in pairs[1].differs()
    crossed = Pair(a[0], b[0], "origin")  # any other pass that joins two endpoints says so
    assert crossed.differs()[0] == "endpoint"
    # "if_shared": an edited file pairs by place only when something it asks is still asked.
    assert [p.matched_by for p in match(a[1:], b[1:], by_place="if_shared")] == [None, None]
    shared = [side("a2", 2, 0, "z"), *a[1:]]
    assert [p.matched_by for p in match(shared, [side("b2", 2, 0, "z"), *b[1:]], by_place="if_shared")] == [
        "input",
        "item",
    ]
