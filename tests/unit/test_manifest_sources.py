"""Expansion provenance: each matrix job's ``variant``, ``source_files``, the registry entry's hash,
and ``diff``'s third pass (item and variant)."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from jobs.diff import JobSide, Pair, match
from jobs.endpoints import get_endpoint, registry_sha256
from jobs.endpoints.registry import _DATA_DIR
from jobs.errors import Issue, ManifestError
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


def test_a_row_path_only_beside_its_file_is_read_there_with_one_warning(folder: Path) -> None:
    """A project laid out as the old README said (``rows/b.png`` named ``b.png`` by the rows
    of ``rows/items.jsonl``) keeps working: the file is found beside the items file since the
    manifest's folder has none, with one warning for the whole file naming the rule, and the
    record spells the path relative to the manifest (``rows/b.png``), as the contract reads it."""
    rows = folder / "rows"
    rows.mkdir()
    Image.new("RGB", (500, 400), (1, 2, 3)).save(rows / "b.png")
    (rows / "items.jsonl").write_text(
        "".join(json.dumps({"prompt": f"row {i}", "image_url": "b.png"}) + "\n" for i in range(3))
    )
    path = folder / "m.yaml"
    path.write_text("name: r\nendpoint: fal-ai/wan-i2v\nitems_from: rows/items.jsonl\n")
    issues: list[Issue] = []
    jobs = list(load_manifest(path).jobs(issues))
    assert [j.input["image_url"] for j in jobs] == [str(rows / "b.png")] * 3
    assert [j.source_files for j in jobs] == [
        {"image_url": {"source": "rows/b.png", "sha256": sha(rows / "b.png")}}
    ] * 3
    (warning,) = issues
    assert (warning.severity, warning.line, warning.item, warning.field) == ("warning", 1, 0, "image_url")
    assert "relative to the manifest's folder" in warning.message
    assert "rows/b.png" in warning.message
    assert "2 more" in warning.message
    report = validate_manifest(path)
    assert report.ok
    assert [str(i) for i in report.issues] == [str(warning)]


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
    item, never ``data/images/a.png`` for the rows of ``data/rows.jsonl``, without a word."""
    _decoy_rows(folder, {"prompt": "default image"})
    path = folder / "m.yaml"
    path.write_text(
        "name: d\nendpoint: fal-ai/wan-i2v\ndefaults: {image_url: images/a.png}\n"
        "items:\n  - prompt: item\nitems_from: data/rows.jsonl\n"
    )
    issues: list[Issue] = []
    jobs = list(load_manifest(path).jobs(issues))
    mine = folder / "images" / "a.png"
    assert [j.input["image_url"] for j in jobs] == [str(mine), str(mine)]
    assert [j.source_files for j in jobs] == [
        {"image_url": {"source": "images/a.png", "sha256": sha(mine)}}
    ] * 2
    assert issues == []


def test_a_row_path_naming_two_different_files_is_refused(folder: Path) -> None:
    """The contract says a row's ``images/a.png`` is the manifest's ``images/a.png``; wanbatch
    read (and sent) ``data/images/a.png``, another image, with nothing said. Both there and
    different: an error at the row's line, item and field naming both, and nothing stored."""
    _decoy_rows(folder, {"prompt": "own image", "image_url": "images/a.png"})
    path = folder / "m.yaml"
    path.write_text("name: d\nendpoint: fal-ai/wan-i2v\nitems_from: data/rows.jsonl\n")
    report = validate_manifest(path)
    (error,) = report.errors
    assert (error.file.endswith("rows.jsonl"), error.line, error.item, error.field) == (
        True,
        1,
        0,
        "image_url",
    )
    assert "images/a.png in the manifest's folder" in error.message
    assert "data/images/a.png beside this items file" in error.message
    assert "\n" not in str(error)
    with pytest.raises(ManifestError):
        list(load_manifest(path).jobs())


def test_a_row_path_whose_two_files_hold_the_same_bytes_is_the_manifests(folder: Path) -> None:
    """Two copies of one image are one input (the job's key is its bytes): the manifest's, no
    error and no warning."""
    _decoy_rows(folder, {"prompt": "own image", "image_url": "images/a.png"})
    shutil.copy(folder / "images" / "a.png", folder / "data" / "images" / "a.png")
    path = folder / "m.yaml"
    path.write_text("name: d\nendpoint: fal-ai/wan-i2v\nitems_from: data/rows.jsonl\n")
    issues: list[Issue] = []
    (job,) = load_manifest(path).jobs(issues)
    assert job.input["image_url"] == str(folder / "images" / "a.png")
    assert job.source_files == {
        "image_url": {"source": "images/a.png", "sha256": sha(folder / "images" / "a.png")}
    }
    assert issues == []


def test_a_csv_row_path_is_relative_to_the_manifest_first(folder: Path) -> None:
    """A CSV row's cell as a JSONL row's value: the manifest's file when there is one."""
    (folder / "data").mkdir()
    (folder / "data" / "rows.csv").write_text("prompt,image_url\nrow,images/a.png\n")
    path = folder / "m.yaml"
    path.write_text("name: c\nendpoint: fal-ai/wan-i2v\nitems_from: data/rows.csv\n")
    issues: list[Issue] = []
    (job,) = load_manifest(path).jobs(issues)
    assert job.input["image_url"] == str(folder / "images" / "a.png")
    assert issues == []


def test_a_row_path_leading_up_from_its_file_still_falls_back(folder: Path) -> None:
    """``../images/a.png`` written in ``data/rows.jsonl`` (the manifest's ``images/a.png`` by
    the old reading) lies outside the manifest's folder by the contract's; the file beside the
    rows is inside, so it is read, with the warning, spelled ``images/a.png``."""
    _decoy_rows(folder, {"prompt": "up", "image_url": "../images/a.png"})
    path = folder / "m.yaml"
    path.write_text("name: u\nendpoint: fal-ai/wan-i2v\nitems_from: data/rows.jsonl\n")
    issues: list[Issue] = []
    (job,) = load_manifest(path).jobs(issues)
    assert job.input["image_url"] == str(folder / "images" / "a.png")
    assert job.source_files is not None
    assert job.source_files["image_url"]["source"] == "images/a.png"
    assert [i.severity for i in issues] == ["warning"]


def test_a_symlink_out_of_the_manifests_folder_is_refused_not_passed_over(
    folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Either base is confined: the manifest's ``images/b.png`` a symlink leading outside is the
    outside error (the file beside the rows is not taken instead), and a symlink beside the
    rows leading outside is never a fallback."""
    outside = tmp_path_factory.mktemp("private") / "secret.png"
    Image.new("RGB", (480, 480), (5, 5, 5)).save(outside)
    (folder / "images" / "b.png").symlink_to(outside)
    _decoy_rows(
        folder, {"prompt": "b", "image_url": "images/b.png"}, {"prompt": "c", "image_url": "images/c.png"}
    )
    Image.new("RGB", (480, 480), (7, 7, 7)).save(folder / "data" / "images" / "b.png")
    (folder / "data" / "images" / "c.png").symlink_to(outside)
    path = folder / "m.yaml"
    path.write_text("name: s\nendpoint: fal-ai/wan-i2v\nitems_from: data/rows.jsonl\n")
    report = validate_manifest(path)
    b, c = report.errors
    assert (b.item, "symbolic link" in b.message) == (0, True)
    # Nothing in the manifest's folder: the row's own file is a link leading out, said as such
    # (with --allow-dir's hint), not "file not found" of a file the user sees there.
    assert (c.item, c.message) == (
        1,
        "'images/c.png' leads outside the manifest's folder through a symbolic link",
    )
    assert "--allow-dir" in str(c.allowed)
    assert str(outside) not in str(report.issues)


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


def test_a_row_path_is_said_once_however_many_matrix_jobs_share_it(folder: Path) -> None:
    """The row's value is the same in each matrix job: one error, or one warning counting the
    row values (not the jobs)."""
    _decoy_rows(folder, {"prompt": "own image", "image_url": "images/a.png"})
    path = folder / "m.yaml"
    path.write_text(
        "name: d\nendpoint: fal-ai/wan-i2v\nmatrix: {seed: [1, 2, 3]}\nitems_from: data/rows.jsonl\n"
    )
    assert [i.field for i in validate_manifest(path).issues] == ["image_url"]
    (folder / "images" / "a.png").unlink()
    issues: list[Issue] = []
    assert len(list(load_manifest(path).jobs(issues))) == 3
    (warning,) = issues
    assert warning.severity == "warning"
    assert "more value" not in warning.message
