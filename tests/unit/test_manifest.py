"""The manifest loader: line-aware safe YAML, resolution order, matrix, items_from, job keys."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pytest
from PIL import Image

from jobs.errors import ManifestError
from jobs.manifest import (
    JobSpec,
    ValidationReport,
    items_from,
    iter_valid_jobs,
    load_manifest,
    validate_manifest,
)
from jobs.manifest import report as manifest_report
from jobs.manifest.items_from import ItemsFile
from jobs.pricing import estimate_job
from jobs.yaml_lines import YamlProblem, load_located

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (480, 480), (100, 150, 200)).save(tmp_path / "a.png")
    Image.new("RGB", (640, 360), (200, 150, 100)).save(tmp_path / "b.jpg")
    return tmp_path


def write(folder: Path, text: str, name: str = "m.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def jobs_of(path: Path) -> list[JobSpec]:
    return list(load_manifest(path).jobs())


# -- examples ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_validates_cleanly(path: Path) -> None:
    report = validate_manifest(path)
    assert report.ok, [str(i) for i in report.issues]
    assert report.issues == []
    assert report.job_count > 0


def test_there_is_an_example_per_endpoint() -> None:
    from jobs.endpoints import known_endpoint_ids

    used = {job.endpoint for path in EXAMPLES.glob("*.yaml") for job in jobs_of(path)}
    assert used == set(known_endpoint_ids())


def test_seed_resolution_sweep_is_six_jobs_for_180_dollars() -> None:
    jobs = jobs_of(EXAMPLES / "seed-resolution-sweep.yaml")
    assert len(jobs) == 6
    assert {(j.input["seed"], j.input["resolution"]) for j in jobs} == {
        (s, r) for s in (1, 2, 3) for r in ("480p", "720p")
    }
    estimates = [estimate_job(j.endpoint, j.input) for j in jobs]
    assert sum(e.billing_units for e in estimates) == Decimal("4.5")
    assert sum(e.usd for e in estimates) == Decimal("1.80")


def test_quickstart_is_three_cheap_jobs() -> None:
    jobs = jobs_of(EXAMPLES / "quickstart.yaml")
    assert len(jobs) == 3
    assert all(j.input.get("resolution") == "480p" for j in jobs)


def test_dataset_streams_1000_prompts_from_jsonl() -> None:
    jobs = jobs_of(EXAMPLES / "dataset.yaml")
    assert len(jobs) == 1000
    assert len({j.input["prompt"] + str(j.input["seed"]) for j in jobs}) == 1000
    assert jobs[0].source.endswith("prompts.jsonl")
    assert jobs[0].line == 1
    assert jobs[999].item_index == 999
    assert jobs[999].line == 1000


# -- top level -------------------------------------------------------------------------------------


def test_top_level_fields_are_parsed(folder: Path) -> None:
    path = write(
        folder,
        "name: demo\ndescription: d\nendpoint: fal-ai/wan-22\n"
        "items:\n  - prompt: hi\nbudget:\n  max_usd: 12.5\n",
    )
    manifest = load_manifest(path)
    assert manifest.name == "demo"
    assert manifest.description == "d"
    assert manifest.endpoint == "fal-ai/wan-22"
    assert manifest.budget_max_usd == Decimal("12.5")
    assert len(manifest.sha256) == 64
    assert manifest.path.is_absolute()


def test_load_manifest_raises_manifest_error_with_located_issues(folder: Path) -> None:
    path = write(folder, "endpoint: fal-ai/wan-22\nitems:\n  - prompt: hi\nbudgett: {}\n")
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    texts = [str(i) for i in caught.value.issues]
    assert any("'name'" in t and "m.yaml:1" in t for t in texts)
    assert any("did you mean 'budget'" in t and "m.yaml:4" in t for t in texts)
    assert caught.value.exit_code == 2


def test_missing_file_is_an_issue_not_a_traceback(tmp_path: Path) -> None:
    report = validate_manifest(tmp_path / "nope.yaml")
    assert not report.ok
    assert report.manifest is None
    assert "not found" in str(report.issues[0])


def test_empty_file_is_refused(folder: Path) -> None:
    report = validate_manifest(write(folder, "# only a comment\n"))
    assert not report.ok
    assert "must be a mapping" in str(report.errors[0])


def test_non_utf8_is_refused_with_a_line(folder: Path) -> None:
    path = folder / "m.yaml"
    path.write_bytes(b"name: x\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: caf\xe9\n")
    report = validate_manifest(path)
    assert "m.yaml:4" in str(report.errors[0])
    assert "UTF-8" in str(report.errors[0])


def test_all_issues_are_collected_in_one_pass(folder: Path) -> None:
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n"
        "  - prompt: a\n    image_url: a.png\n    num_frames: 5\n"
        "  - prompt: b\n    image_url: missing.png\n"
        "  - promt: c\n    image_url: a.png\n",
    )
    report = validate_manifest(path)
    items = sorted({i.item for i in report.errors}, key=lambda item: -1 if item is None else item)
    assert items == [0, 1, 2]
    assert [i.line for i in report.issues] == sorted(i.line or 0 for i in report.issues)
    assert report.job_count == 3


# -- resolution ------------------------------------------------------------------------------------


def test_defaults_then_item_then_matrix(folder: Path) -> None:
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\n"
        "defaults: {resolution: 720p, num_frames: 90, seed: 1}\n"
        "matrix:\n  seed: [7, 8]\n"
        "items:\n  - prompt: p\n    image_url: a.png\n    num_frames: 81\n    seed: 5\n",
    )
    report = validate_manifest(path)
    assert report.ok
    warnings = report.warnings
    assert len(warnings) == 1
    assert "matrix" in warnings[0].message
    assert warnings[0].field == "seed"
    jobs = jobs_of(path)
    assert [j.input["seed"] for j in jobs] == [7, 8]
    assert all(j.input["num_frames"] == 81 and j.input["resolution"] == "720p" for j in jobs)
    assert [j.matrix for j in jobs] == [{"seed": 7}, {"seed": 8}]


def test_a_list_in_defaults_for_a_field_the_matrix_sets_is_an_error(folder: Path) -> None:
    """The matrix overwrote the default before validation: the sweep written in ``defaults``
    passed as "all valid". Said once, at the default's line, whatever the number of items."""
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nmatrix: {seed: [7]}\ndefaults: {seed: [1, 2, 3]}\n"
        "items:\n  - {prompt: a, image_url: a.png}\n  - {prompt: b, image_url: b.jpg}\n",
    )
    (error,) = validate_manifest(path).errors
    assert (error.line, error.field) == (4, "seed")
    assert "got a list [1, 2, 3]; a list makes one job per value only under `matrix:`" in error.message
    assert "the matrix sets 'seed' too" in error.message


def test_a_list_in_an_item_for_a_field_the_matrix_sets_is_an_error(folder: Path) -> None:
    """It was only the warning "the matrix values are used"; the README calls it an error."""
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nmatrix: {seed: [7]}\n"
        "items:\n  - prompt: a\n    image_url: a.png\n    seed: [1, 2, 3]\n",
    )
    report = validate_manifest(path)
    (error,) = report.errors
    assert (error.line, error.item, error.field) == (7, 0, "seed")
    assert "a list makes one job per value only under `matrix:`" in error.message
    (warning,) = report.warnings
    assert "the matrix values are used" in warning.message


def test_an_invalid_value_the_matrix_overrides_is_an_error_a_file_is_not_read(folder: Path) -> None:
    """A value refused without the matrix is refused with it (removing the matrix must not
    reveal an error); a local file it overrides is never sent, so it is not read."""
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nmatrix: {seed: [7], image_url: [a.png]}\n"
        "defaults: {seed: abc, image_url: missing.png}\nitems:\n  - {prompt: a}\n",
    )
    (error,) = validate_manifest(path).errors
    assert (error.line, error.field) == (4, "seed")
    assert "expected an integer, got text 'abc'" in error.message
    fine = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nmatrix: {image_url: [a.png]}\n"
        "defaults: {image_url: missing.png, seed: null}\nitems:\n  - {prompt: a}\n",
        "fine.yaml",
    )
    assert validate_manifest(fine).issues == []


def test_endpoint_defaults_are_not_injected(folder: Path) -> None:
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: hi\n")
    (job,) = jobs_of(path)
    assert job.input == {"prompt": "hi"}


def test_null_unsets_a_default(folder: Path) -> None:
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-22\ndefaults: {seed: 3}\nitems:\n  - prompt: hi\n    seed: null\n",
    )
    (job,) = jobs_of(path)
    assert "seed" not in job.input


def test_matrix_is_a_cartesian_product_over_every_item(folder: Path) -> None:
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nmatrix:\n  seed: [1, 2, 3]\n  resolution: [480p, 720p]\n"
        "items:\n  - {prompt: a, image_url: a.png}\n  - {prompt: b, image_url: b.jpg}\n",
    )
    jobs = jobs_of(path)
    assert len(jobs) == 12
    assert [j.item_index for j in jobs] == [0] * 6 + [1] * 6
    assert len({j.key for j in jobs}) == 12


def test_int_is_accepted_for_numeric_text_enum(folder: Path) -> None:
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-25-preview/image-to-video\n"
        "items:\n  - {prompt: a, image_url: a.png, duration: 10}\n",
    )
    assert validate_manifest(path).ok
    (job,) = jobs_of(path)
    assert job.input["duration"] == "10"


def test_base60_looking_values_stay_text(folder: Path) -> None:
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a\n    aspect_ratio: 16:9\n")
    assert validate_manifest(path).ok
    assert jobs_of(path)[0].input["aspect_ratio"] == "16:9"


def test_local_media_becomes_absolute(folder: Path) -> None:
    (folder / "sub").mkdir()
    shutil.copy(folder / "a.png", folder / "sub" / "c.png")
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n"
        "  - {prompt: a, image_url: sub/c.png}\n  - {prompt: b, image_url: 'https://example.com/x.png'}\n",
    )
    jobs = jobs_of(path)
    assert jobs[0].input["image_url"] == str((folder / "sub" / "c.png").resolve())
    assert jobs[1].input["image_url"] == "https://example.com/x.png"


def test_per_item_endpoint_override(folder: Path) -> None:
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a\n"
        "  - endpoint: fal-ai/wan-flf2v\n    prompt: b\n"
        "    start_image_url: a.png\n    end_image_url: b.jpg\n",
    )
    assert validate_manifest(path).ok
    assert [j.endpoint for j in jobs_of(path)] == ["fal-ai/wan-22", "fal-ai/wan-flf2v"]
    assert "endpoint" not in jobs_of(path)[1].input


def test_items_need_no_top_level_endpoint_when_each_names_one(folder: Path) -> None:
    path = write(folder, "name: x\nitems:\n  - {endpoint: fal-ai/wan-22, prompt: a}\n")
    assert validate_manifest(path).ok


def test_merge_keys_work(folder: Path) -> None:
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-22\nbase: &b {resolution: 480p, seed: 1}\n"
        "items:\n  - {<<: *b, prompt: a, seed: 2}\n",
    )
    report = validate_manifest(path)
    assert any("unknown top-level key 'base'" in str(i) for i in report.errors)
    (job,) = load_manifest(write(folder, path.read_text().replace("base:", "defaults:"), "n.yaml")).jobs()
    assert job.input == {"resolution": "480p", "seed": 2, "prompt": "a"}


# -- job keys ------------------------------------------------------------------------------------


def test_keys_are_deterministic_and_content_addressed(folder: Path) -> None:
    text = "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n  - {prompt: a, image_url: a.png, seed: 1}\n"
    first = jobs_of(write(folder, text))[0].key
    assert jobs_of(write(folder, text, "again.yaml"))[0].key == first

    moved = folder / "moved"
    moved.mkdir()
    shutil.copy(folder / "a.png", moved / "a.png")
    assert jobs_of(write(moved, text))[0].key == first  # same bytes elsewhere: same key

    Image.new("RGB", (480, 480), (1, 2, 3)).save(moved / "a.png")
    assert jobs_of(write(moved, text, "changed.yaml"))[0].key != first  # new bytes: new key

    other = text.replace("seed: 1", "seed: 2")
    assert jobs_of(write(folder, other, "other.yaml"))[0].key != first


def test_a_text_enum_is_never_read_as_a_file(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`resolution: 720p` names no file: a file called 720p where wanbatch runs must not change the key."""
    text = "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n  - {prompt: a, image_url: a.png, resolution: 720p}\n"
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = jobs_of(write(folder, text))[0].key
    (elsewhere / "720p").write_bytes(b"not a resolution")
    assert jobs_of(write(folder, text, "again.yaml"))[0].key == before


def test_key_ignores_key_order(folder: Path) -> None:
    a = jobs_of(write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems:\n  - {prompt: a, seed: 1}\n"))[0]
    b = jobs_of(
        write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems:\n  - {seed: 1, prompt: a}\n", "b.yaml")
    )[0]
    assert a.key == b.key
    assert len(a.key) == 64


def test_identical_jobs_collapse_with_a_warning(folder: Path) -> None:
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-22\nitems:\n"
        "  - {prompt: a, seed: 1}\n  - {prompt: b}\n  - {seed: 1, prompt: a}\n",
    )
    report = validate_manifest(path)
    assert report.ok
    assert report.job_count == 2
    (warning,) = report.warnings
    assert warning.item == 2
    assert "item 0 (" in warning.message
    assert "m.yaml:4)" in warning.message
    assert "m.yaml:6" in str(warning)
    assert [j.item_index for j in jobs_of(path)] == [0, 1]


def test_a_number_is_one_job_and_one_default_however_it_is_written(folder: Path) -> None:
    """The schema audit's ``num``: ``guide_scale: 5`` and ``5.0`` are one request to fal (it reads
    a float), so they collapse, and ``shift: 5.0`` writes out the default ``5`` as ``shift: 5``
    does; each was a job of its own, sent and billed, with no warning. The value sent stays as
    written."""
    path = write(
        folder,
        "name: num\nendpoint: fal-ai/wan-i2v\nitems:\n"
        "  - {prompt: same, image_url: b.jpg, seed: 7, guide_scale: 5}\n"
        "  - {prompt: same, image_url: b.jpg, seed: 7, guide_scale: 5.0}\n"
        "  - {prompt: other, image_url: b.jpg, seed: 7, shift: 5.0}\n"
        "  - {prompt: other, image_url: b.jpg, seed: 7}\n",
    )
    report = validate_manifest(path)
    assert (report.ok, report.job_count) == (True, 3)
    collapsed, defaults = report.warnings
    assert (collapsed.item, "identical to the job of item 0" in collapsed.message) == (1, True)
    assert defaults.item == 3
    assert "they differ only by shift: 5 (the endpoint's defaults)" in defaults.message
    jobs = jobs_of(path)
    assert [j.item_index for j in jobs] == [0, 2, 3]
    shift = jobs[1].input["shift"]
    assert (shift, type(shift)) == (5.0, float)


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("5", "5.0", True),
        ("5", "5.00", True),
        ("100", "1e2", True),
        ("0", "-0.0", True),
        ("-3", "-3.0", True),
        ("12345678901234568", "1.2345678901234568e16", True),
        # The float nearest 12345678901234567 is 12345678901234568: two values, two keys.
        ("12345678901234567", "1.2345678901234567e16", False),
        ("5", "5.5", False),
    ],
)
def test_equal_numbers_give_one_key(folder: Path, one: str, other: str, same: bool) -> None:
    """Numbers equal in value are one key at any size (a whole float is keyed as the int of its
    exact value); numbers that differ never are."""

    def key(value: str, name: str) -> str:
        text = f"name: x\nendpoint: fal-ai/wan-22\nitems:\n  - {{prompt: a, guide_scale: {value}}}\n"
        return jobs_of(write(folder, text, name))[0].key

    assert (key(one, "a.yaml") == key(other, "b.yaml")) is same


def test_numbers_not_equal_keep_their_own_keys(folder: Path) -> None:
    """``true`` is no number and ``'5'`` is text: neither is the number 5."""
    text = "name: x\nendpoint: fal-ai/wan-22\nitems:\n  - {{prompt: a, guide_scale: {}}}\n"
    keys = {jobs_of(write(folder, text.format(v)))[0].key for v in ("5", "5.000001", "1", "true", "'5'")}
    assert len(keys) == 5


def test_a_job_dropped_as_identical_is_still_validated(folder: Path) -> None:
    """An empty data URI and a zero-byte file are the same bytes, so the same job: the second was
    dropped before validation, and its own error (the file) was never said, only "it runs once"."""
    (folder / "empty.png").write_bytes(b"")
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n"
        '  - {prompt: a, image_url: "data:image/png;base64,"}\n'
        "  - {prompt: a, image_url: empty.png}\n",
    )
    report = validate_manifest(path)
    assert report.job_count == 1
    assert [(e.item, e.field) for e in report.errors] == [(0, "image_url"), (1, "image_url")]
    assert "the data URI is empty" in report.errors[0].message
    assert "not a readable image" in report.errors[1].message
    (warning,) = report.warnings
    assert (warning.item, "identical to the job of item 0" in warning.message) == (1, True)


def test_identical_invalid_jobs_each_say_their_error(folder: Path) -> None:
    """Each item's error at its own line, not only the first's."""
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-22\nitems:\n  - {prompt: a, num_frames: 5000}\n"
        "  - {prompt: a, num_frames: 5000}\n",
    )
    report = validate_manifest(path)
    assert [(e.item, e.line, e.field) for e in report.errors] == [(0, 4, "num_frames"), (1, 5, "num_frames")]


# -- items_from ----------------------------------------------------------------------------------


def test_items_from_jsonl_continues_indices_and_reports_its_own_lines(folder: Path) -> None:
    (folder / "data").mkdir()
    shutil.copy(folder / "a.png", folder / "data" / "local.png")
    (folder / "data" / "rows.jsonl").write_text(
        json.dumps({"prompt": "r1", "image_url": "local.png"})
        + "\n\n"
        + json.dumps({"prompt": "r2", "image_url": "local.png", "num_frames": 500})
        + "\n"
    )
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n"
        "  - {prompt: a, image_url: a.png}\nitems_from: data/rows.jsonl\n",
    )
    jobs = jobs_of(path)
    assert [j.item_index for j in jobs] == [0, 1, 2]
    assert [j.line for j in jobs] == [4, 1, 3]
    assert jobs[1].input["image_url"] == str(
        (folder / "data" / "local.png").resolve()
    )  # relative to the JSONL
    (error,) = validate_manifest(path).errors
    assert error.item == 2
    assert error.line == 3
    assert error.field == "num_frames"
    assert "rows.jsonl:3" in str(error)


def test_items_from_is_read_lazily_and_streamed(folder: Path) -> None:
    rows = folder / "rows.jsonl"
    rows.write_text("this is not JSON\n")
    manifest = load_manifest(write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n"))
    rows.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))  # loading read nothing
    stream = manifest.jobs()
    assert not isinstance(stream, list)
    assert next(stream).input == {"prompt": "p0"}
    assert [j.input["prompt"] for j in stream] == ["p1", "p2"]


def test_jsonl_duplicate_keys_are_refused(folder: Path) -> None:
    (folder / "rows.jsonl").write_text('{"prompt": "a", "prompt": "b"}\n')
    report = validate_manifest(write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n"))
    assert "duplicate key 'prompt'" in str(report.errors[0])
    assert "rows.jsonl:1" in str(report.errors[0])


def test_csv_cells_are_coerced_by_field_type(folder: Path) -> None:
    (folder / "rows.csv").write_text(
        "prompt,num_frames,guidance_scale,enable_prompt_expansion,seed,aspect_ratio\n"
        "a,81,4.5,true,,16:9\n"
        '"multi\nline",100,5,no,7,\n'
    )
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.csv\n")
    assert validate_manifest(path).ok
    first, second = jobs_of(path)
    assert first.input == {
        "prompt": "a",
        "num_frames": 81,
        "guidance_scale": 4.5,
        "enable_prompt_expansion": True,
        "aspect_ratio": "16:9",
    }
    assert second.input["enable_prompt_expansion"] is False
    assert second.input["seed"] == 7
    assert (first.line, second.line) == (2, 3)


def test_an_empty_csv_endpoint_cell_means_the_top_level_endpoint(folder: Path) -> None:
    """An empty cell means "absent", the endpoint's too: it was "the item's endpoint is empty"."""
    (folder / "rows.csv").write_text("prompt,seed,endpoint\nhi,3,fal-ai/wan-22\nho,4,\n")
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.csv\n")
    report = validate_manifest(path)
    assert report.ok, [str(i) for i in report.issues]
    assert report.issues == []
    assert [(j.endpoint, j.input) for j in jobs_of(path)] == [
        ("fal-ai/wan-22", {"prompt": "hi", "seed": 3}),
        ("fal-ai/wan-22", {"prompt": "ho", "seed": 4}),
    ]


def test_an_empty_csv_endpoint_cell_without_a_top_level_endpoint_says_none_is_set(folder: Path) -> None:
    (folder / "rows.csv").write_text("prompt,endpoint\nho,\n")
    (error,) = validate_manifest(write(folder, "name: x\nitems_from: rows.csv\n")).errors
    assert (error.line, error.item, error.field) == (2, 0, "endpoint")
    assert error.message.startswith("no endpoint")


@pytest.mark.parametrize("body", ["  - {prompt: a, endpoint: ''}\n", "  - {prompt: a, endpoint: }\n"])
def test_an_explicit_empty_endpoint_in_yaml_is_still_an_error(folder: Path, body: str) -> None:
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems:\n" + body)
    (error,) = validate_manifest(path).errors
    assert (error.line, error.item, error.field) == (4, 0, "endpoint")
    assert "the item's endpoint is empty" in error.message


def test_an_explicit_empty_endpoint_in_jsonl_is_still_an_error(folder: Path) -> None:
    (folder / "rows.jsonl").write_text('{"prompt": "a", "endpoint": ""}\n')
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n")
    (error,) = validate_manifest(path).errors
    assert "the item's endpoint is empty" in error.message


def test_an_empty_csv_seed_cell_is_no_seed_the_matrix_overrides(folder: Path) -> None:
    """The warning "the item sets seed, which the matrix also sets" came for every row whose seed
    cell was empty; only a row that does set a seed gets it."""
    (folder / "rows.csv").write_text("prompt,seed\nhi,\nho,5\n")
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nmatrix: {seed: [1, 2]}\nitems_from: rows.csv\n")
    report = validate_manifest(path)
    assert report.ok
    assert [(w.line, w.item, w.field) for w in report.issues] == [(3, 1, "seed")]
    assert "which the matrix also sets" in report.issues[0].message
    assert [j.input["seed"] for j in jobs_of(path)] == [1, 2, 1, 2]


def test_a_csv_row_not_utf8_is_refused_at_its_own_line_and_item(folder: Path) -> None:
    """The decoder reads ahead in blocks: its error named line 1, item 0 and stopped reading.
    The row holding the byte is refused where it is, as in JSONL, and the others still count."""
    (folder / "rows.csv").write_bytes(b'prompt,seed\nr1,1\nr2,2\n"multi\nline",3\ncaf\xe9,4\nr5,5\n')
    report = validate_manifest(write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.csv\n"))
    (error,) = report.errors
    assert "rows.csv:6: item 3: not UTF-8 text" in str(error), str(error)
    assert report.job_count == 4


def test_a_csv_header_not_utf8_is_refused_at_line_1(folder: Path) -> None:
    (folder / "rows.csv").write_bytes(b"\xef\xbb\xbfprompt,s\xe9ed\nr1,1\n")
    report = validate_manifest(write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.csv\n"))
    (error,) = report.errors
    assert "rows.csv:1: the header row is not UTF-8 text" in str(error), str(error)


def test_csv_extra_cells_are_refused(folder: Path) -> None:
    (folder / "rows.csv").write_text("prompt\na,b\n")
    report = validate_manifest(write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.csv\n"))
    assert "rows.csv:2" in str(report.errors[0])
    assert "item 0" in str(report.errors[0])


# -- hostile YAML --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("a: !!python/object/apply:os.system ['true']\n", "python/object"),
        ("a: !!binary aGk=\n", "binary"),
        ("a: &x [*x]\n", "self-referencing"),
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nesting"),
        ("- " * 300 + "x\n", "nesting"),
        ("a: 1\n---\nb: 2\n", "single document"),
        ("{1: x}\n", "keys must be text"),
    ],
)
def test_hostile_yaml_is_refused_with_a_message(text: str, phrase: str) -> None:
    with pytest.raises(YamlProblem) as caught:
        load_located(text)
    assert phrase in caught.value.message


@pytest.mark.timeout(60)  # expanded, 9⁹ "lol"s would take minutes and gigabytes, never this
def test_billion_laughs_is_refused_fast() -> None:
    """Refused by its aliases while it is read, before anything is expanded. (No wall-clock
    assertion: the suite runs in two processes, and a loaded machine once took 2.01 s here.)"""
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    with pytest.raises(YamlProblem, match="alias"):
        load_located("\n".join(levels) + "\n")


def test_modest_alias_use_is_fine() -> None:
    value, duplicates = load_located("d: &d {x: 1}\nitems: [*d, *d, *d]\n")
    assert value["items"] == [{"x": 1}] * 3
    assert duplicates == []


def test_lines_are_kept() -> None:
    value, _ = load_located("a: 1\nb:\n  - x\n  - y\nc:\n  k: v\n")
    assert value.lines == {"a": 1, "b": 3, "c": 6}
    assert value.key_lines == {"a": 1, "b": 2, "c": 5}
    assert value["b"].lines == [3, 4]


def test_duplicate_keys_name_both_lines(folder: Path) -> None:
    report = validate_manifest(
        write(folder, "name: x\nendpoint: fal-ai/wan-22\nname: y\nitems: [{prompt: a}]\n")
    )
    (error,) = report.errors
    assert "first at line 1, again at line 3" in error.message
    assert error.line == 3


# -- performance -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_100k_items_from_validates_quickly(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (folder / "rows.jsonl").open("w") as fh:
        for i in range(100_000):
            fh.write(json.dumps({"prompt": f"prompt {i}", "seed": i, "image_url": "b.jpg"}) + "\n")
    path = write(
        folder, "name: big\nendpoint: fal-ai/wan-i2v\ndefaults: {resolution: 480p}\nitems_from: rows.jsonl\n"
    )
    # iter_valid_jobs validates the whole file before it streams the jobs: its own (real)
    # validation's report is the one checked, rather than a third pass over the 100k rows.
    reports: list[ValidationReport] = []

    def validating(*args: Any, **kwargs: Any) -> ValidationReport:
        reports.append(validate_manifest(*args, **kwargs))
        return reports[-1]

    monkeypatch.setattr(manifest_report, "validate_manifest", validating)
    count = sum(1 for _ in iter_valid_jobs(path))
    [report] = reports
    assert report.ok
    assert report.job_count == 100_000
    assert count == 100_000


def test_iter_valid_jobs_refuses_an_invalid_manifest(folder: Path) -> None:
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems: [{prompt: a}, {prompt: b, seed: x}]\n")
    with pytest.raises(ManifestError) as caught:
        list(iter_valid_jobs(path))
    assert any("item 1" in str(i) and "'seed'" in str(i) for i in caught.value.issues)


# -- local files stay inside the manifest's folder (issue #9, item 15) ---------------------------


def _victim(tmp_path: Path) -> Path:
    """A private image beside (not inside) the manifest's folder, and that folder."""
    (tmp_path / "victim").mkdir()
    Image.new("RGB", (480, 480), (1, 2, 3)).save(tmp_path / "victim" / "passport.jpg")
    shared = tmp_path / "shared"
    shared.mkdir()
    Image.new("RGB", (480, 480), (4, 5, 6)).save(shared / "ok.png")
    return shared


def _outside_errors(path: Path, allowed: tuple[Path, ...] = ()) -> list[str]:
    return [str(i) for i in validate_manifest(path, allowed).errors if "outside the manifest" in i.message]


@pytest.mark.parametrize(
    "reference",
    ["../victim/passport.jpg", "{victim}/passport.jpg", "shared/../../victim/passport.jpg", "link.jpg"],
    ids=["dotdot", "absolute", "roundabout", "symlink"],
)
def test_local_paths_outside_the_folder_are_located_errors(tmp_path: Path, reference: str) -> None:
    shared = _victim(tmp_path)
    (shared / "link.jpg").symlink_to(tmp_path / "victim" / "passport.jpg")
    reference = reference.format(victim=tmp_path / "victim")
    if reference.startswith("shared/"):
        (shared / "shared").mkdir()
    path = write(
        shared,
        "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n"
        f"  - prompt: fine\n    image_url: ok.png\n  - prompt: leak\n    image_url: {reference}\n",
    )
    (error,) = _outside_errors(path)
    assert "m.yaml:7: item 1: field 'image_url'" in error
    assert "--allow-dir" in error
    assert "WANBATCH_ALLOWED_INPUT_DIRS" in error
    with pytest.raises(ManifestError):  # the submit path refuses it too
        list(iter_valid_jobs(path))


def test_home_relative_path_is_outside_unless_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = _victim(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "victim"))
    path = write(
        shared, "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n  - {prompt: a, image_url: ~/passport.jpg}\n"
    )
    assert len(_outside_errors(path)) == 1
    report = validate_manifest(path, (tmp_path / "victim",))
    assert report.ok, [str(i) for i in report.issues]


def test_a_missing_outside_file_gets_the_same_answer_as_an_existing_one(tmp_path: Path) -> None:
    """The message must not tell a shared manifest's author which private files exist."""
    shared = _victim(tmp_path)
    exists = write(
        shared, "name: x\nendpoint: fal-ai/wan-i2v\nitems: [{prompt: a, image_url: ../victim/passport.jpg}]\n"
    )
    missing = write(
        shared,
        "name: x\nendpoint: fal-ai/wan-i2v\nitems: [{prompt: a, image_url: ../victim/nope.jpg}]\n",
        "n.yaml",
    )
    (first,) = validate_manifest(exists).errors
    (second,) = validate_manifest(missing).errors
    assert "outside" in first.message
    assert "outside" in second.message
    assert "not found" not in first.message + second.message


def test_an_outside_message_names_no_link_target_and_not_whether_it_exists(tmp_path: Path) -> None:
    """A symlink out of the folder (or into a private folder) is refused without naming where it
    points, and a missing file beside an existing one gets the same words: only the value as
    written and its lexical form, nothing read outside the allowed folders."""
    shared = _victim(tmp_path)
    (tmp_path / "private" / "keys").mkdir(parents=True)
    (tmp_path / "private" / "keys" / "id_rsa").write_text("secret")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "cfg").symlink_to(tmp_path / "private" / "keys")
    (shared / "keys").symlink_to(tmp_path / "private" / "keys")
    (shared / "gone").symlink_to(tmp_path / "private" / "nothing")
    path = write(
        shared,
        "name: x\nendpoint: fal-ai/wan-i2v\nitems:\n"
        "  - {prompt: a, image_url: ../outside/cfg/id_rsa}\n"
        "  - {prompt: b, image_url: ../outside/nocfg/id_rsa}\n"
        "  - {prompt: c, image_url: keys/id_rsa}\n"
        "  - {prompt: d, image_url: gone/id_rsa}\n",
    )
    messages = [i.message for i in validate_manifest(path).errors]
    assert len(messages) == 4, messages
    assert not any("private" in m or "nothing" in m for m in messages), messages
    lexical = tmp_path.resolve() / "outside"
    outside = "outside the manifest's folder"
    assert messages[0] == f"'../outside/cfg/id_rsa' is {lexical}/cfg/id_rsa, {outside}"
    assert messages[1] == f"'../outside/nocfg/id_rsa' is {lexical}/nocfg/id_rsa, {outside}"
    assert messages[2] == "'keys/id_rsa' leads outside the manifest's folder through a symbolic link"
    assert messages[3] == "'gone/id_rsa' leads outside the manifest's folder through a symbolic link"


def test_an_outside_file_is_never_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = _victim(tmp_path)
    opened: list[str] = []
    real_open = Path.open

    def spy(
        self: Path,
        mode: str = "r",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        opened.append(str(self))
        return real_open(self, mode, buffering, encoding, errors, newline)

    monkeypatch.setattr(Path, "open", spy)
    path = write(
        shared, "name: x\nendpoint: fal-ai/wan-i2v\nitems: [{prompt: a, image_url: ../victim/passport.jpg}]\n"
    )
    assert not validate_manifest(path).ok
    assert not any("passport" in name for name in opened)


def test_allowed_dirs_let_a_folder_in_explicitly(tmp_path: Path) -> None:
    shared = _victim(tmp_path)
    path = write(
        shared, "name: x\nendpoint: fal-ai/wan-i2v\nitems: [{prompt: a, image_url: ../victim/passport.jpg}]\n"
    )
    report = validate_manifest(path, (tmp_path / "victim",))
    assert report.ok, [str(i) for i in report.issues]
    (job,) = load_manifest(path, (tmp_path / "victim",)).jobs()
    assert job.input["image_url"] == str((tmp_path / "victim" / "passport.jpg").resolve())


def test_a_symlink_inside_the_folder_to_the_folder_is_fine(folder: Path) -> None:
    (folder / "alias.png").symlink_to(folder / "a.png")
    path = write(folder, "name: x\nendpoint: fal-ai/wan-i2v\nitems: [{prompt: a, image_url: alias.png}]\n")
    (job,) = iter_valid_jobs(path)
    assert job.input["image_url"] == str((folder / "a.png").resolve())  # stored fully resolved


def test_outside_paths_in_defaults_and_items_from_rows_are_located(tmp_path: Path) -> None:
    shared = _victim(tmp_path)
    (shared / "rows.jsonl").write_text(
        json.dumps({"prompt": "r", "image_url": "../victim/passport.jpg"}) + "\n"
    )
    path = write(
        shared,
        "name: x\nendpoint: fal-ai/wan-i2v\ndefaults:\n  image_url: /etc/hostname\n"
        "items: [{prompt: a}]\nitems_from: rows.jsonl\n",
    )
    errors = _outside_errors(path)
    assert any("m.yaml:4: item 0: field 'image_url'" in e for e in errors), errors
    assert any("rows.jsonl:1: item 1: field 'image_url'" in e for e in errors), errors


@pytest.mark.parametrize("source", ["../victim/rows.jsonl", "link.jsonl"], ids=["dotdot", "symlink"])
def test_items_from_outside_the_folder_is_refused(tmp_path: Path, source: str) -> None:
    shared = _victim(tmp_path)
    (tmp_path / "victim" / "rows.jsonl").write_text('{"prompt": "secret"}\n')
    (shared / "link.jsonl").symlink_to(tmp_path / "victim" / "rows.jsonl")
    path = write(shared, f"name: x\nendpoint: fal-ai/wan-22\nitems_from: {source}  # here\n")
    report = validate_manifest(path)
    assert any(
        "m.yaml:3: field 'items_from'" in str(i) and "outside the manifest" in i.message
        for i in report.errors
    ), [str(i) for i in report.issues]
    assert report.job_count == 0  # its rows were never read
    assert validate_manifest(path, (tmp_path / "victim",)).ok


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_items_from_that_is_no_regular_file_says_so(folder: Path, kind: str) -> None:
    """A named pipe would block the reader forever; a folder cannot be read: both are refused
    unopened, and the message says what is wrong rather than "not found"."""
    target = folder / "rows.jsonl"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n")
    report = validate_manifest(path)
    (issue,) = report.errors
    assert "m.yaml:3: field 'items_from'" in str(issue)
    assert "is not a regular file" in issue.message
    assert "a regular JSONL or CSV file" in str(issue)


# -- NUL characters (issue #9, item 18) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ('name: "a\\0b"\nendpoint: fal-ai/wan-22\nitems: [{prompt: x}]\n', "m.yaml:1: field 'name'"),
        (
            'name: a\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "x\\0y"\n',
            "m.yaml:4: item 0: field 'prompt'",
        ),
        (
            'name: a\nendpoint: fal-ai/wan-22\ndefaults:\n  negative_prompt: "n\\0"\nitems: [{prompt: x}]\n',
            "m.yaml:4: item 0: field 'negative_prompt'",
        ),
        (
            'name: a\nendpoint: fal-ai/wan-22\nmatrix:\n  aspect_ratio: ["16:9", "1\\0"]\n'
            "items: [{prompt: x}]\n",
            "m.yaml:4: item 0: field 'aspect_ratio'",
        ),
        (
            'name: a\nendpoint: fal-ai/wan-i2v\nitems:\n  - {prompt: x, image_url: "a\\0.png"}\n',
            "m.yaml:4: item 0: field 'image_url'",
        ),
        (
            'name: a\ndescription: "d\\0"\nendpoint: fal-ai/wan-22\nitems: [{prompt: x}]\n',
            "m.yaml:2: field 'description'",
        ),
    ],
    ids=["name", "prompt", "defaults", "matrix", "image_path", "description"],
)
def test_nul_characters_are_located_errors(folder: Path, body: str, where: str) -> None:
    path = write(folder, body)
    report = validate_manifest(path)
    texts = [str(i) for i in report.errors]
    assert any(where in t and "NUL character" in t for t in texts), texts


@pytest.mark.parametrize("description", ["[a]", "{a: 1}", "12"])
def test_a_description_that_is_no_text_says_what_is_allowed(folder: Path, description: str) -> None:
    """`description: [a]` said "must be text, got a list" without what to write instead."""
    path = write(
        folder, f"name: a\ndescription: {description}\nendpoint: fal-ai/wan-22\nitems: [{{prompt: x}}]\n"
    )
    (issue,) = validate_manifest(path).errors
    assert (issue.line, issue.field) == (2, "description")
    assert str(issue).endswith(
        '(allowed: text; quote it when it starts with [ or {, as in description: "[draft] spring teaser")'
    )


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_nul_characters_in_items_from_rows_are_located(folder: Path, kind: str) -> None:
    if kind == "jsonl":
        (folder / "rows.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "bad\\u0000"}\n')
    else:
        (folder / "rows.csv").write_text("prompt\nok\nbad\0\n")
    path = write(folder, f"name: a\nendpoint: fal-ai/wan-22\nitems_from: rows.{kind}\n")
    texts = [str(i) for i in validate_manifest(path).errors]
    line = 2 if kind == "jsonl" else 3
    assert any(f"rows.{kind}:{line}: item 1: field 'prompt'" in t and "NUL" in t for t in texts), texts


def test_nul_in_a_nested_value_or_key_is_refused(folder: Path) -> None:
    from jobs.validation import has_nul

    assert has_nul({"a": ["b", {"c\0": 1}]})
    assert has_nul(["x", ["y\0"]])
    assert not has_nul({"a": ["b", {"c": 1.5}], "d": None})


def test_a_huge_matrix_is_refused_from_its_sizes_before_anything_is_expanded(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1000 × 1000 × 1000 values: the product of the list lengths is over the limit, so neither
    validation nor the submit path builds (or even starts streaming) a single combination."""
    from jobs.manifest.expand import Manifest

    def never(*_: object, **__: object) -> None:
        raise AssertionError("the matrix was expanded")

    monkeypatch.setattr(Manifest, "jobs", never)
    monkeypatch.setattr(Manifest, "_combos", never)
    values = ", ".join(str(i) for i in range(1000))
    path = write(
        folder,
        f"name: x\nendpoint: fal-ai/wan-22\nmatrix:\n  seed: [{values}]\n  num_frames: [{values}]\n"
        f"  num_inference_steps: [{values}]\nitems:\n  - prompt: hi\n",
    )
    report = validate_manifest(path)
    assert [str(i) for i in report.errors] == [
        f"{path}:3: field 'matrix': the manifest expands to more than 1,000,000 jobs; split it "
        "(allowed: at most 1,000,000 jobs per manifest)"
    ]
    with pytest.raises(ManifestError, match="more than 1,000,000 jobs"):
        list(iter_valid_jobs(path))


def test_items_times_matrix_over_the_limit_is_refused_up_front(folder: Path) -> None:
    items = "".join(f"  - prompt: p{i}\n" for i in range(1001))
    values = ", ".join(str(i) for i in range(1000))
    path = write(folder, f"name: x\nendpoint: fal-ai/wan-22\nmatrix:\n  seed: [{values}]\nitems:\n{items}")
    report = validate_manifest(path)
    assert report.job_count == 0
    assert any("more than 1,000,000 jobs; split it" in str(i) for i in report.errors)


def _count_reads_of(name: str, monkeypatch: pytest.MonkeyPatch) -> list[ItemsFile]:
    """Every opening of the data file ``name``, each counting (and hashing) the bytes read from
    it (:class:`jobs.manifest.items_from.ItemsFile`): how far into the file the reader went."""
    opened: list[ItemsFile] = []

    class Counted(ItemsFile):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            if path.name == name:
                opened.append(self)

    monkeypatch.setattr(items_from, "ItemsFile", Counted)
    return opened


def _lower_the_job_limit(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    for module in ("expand", "loading", "report"):
        monkeypatch.setattr(f"jobs.manifest.{module}.MAX_JOBS", limit)


_ROWS: dict[str, Callable[[int], str]] = {
    "jsonl": lambda i: json.dumps({"prompt": f"p{i}"}),
    "csv": lambda i: f"p{i}",
    "jsonl-duplicates": lambda i: json.dumps({"prompt": "the same"}),
    "jsonl-bad": lambda i: "{not json",
}


@pytest.mark.parametrize("rows", list(_ROWS))
def test_an_items_from_file_past_the_job_limit_is_refused_at_the_row_that_passes_it(
    folder: Path, monkeypatch: pytest.MonkeyPatch, rows: str
) -> None:
    """A data file of more rows than the job limit allows is refused at the first row too many,
    with its file and line, and not one line after it is read: a 5 GB file was read to its end
    (or, when its rows made no job, bad or repeated ones, never refused at all) before the
    user heard "too many". Lowered here from 1,000,000 to 5; 10,000 rows follow the limit."""
    _lower_the_job_limit(monkeypatch, 5)
    kind = rows.partition("-")[0]
    header = "prompt\n" if kind == "csv" else ""
    data = folder / f"rows.{kind}"
    data.write_text(header + "".join(_ROWS[rows](i) + "\n" for i in range(10_005)))
    path = write(folder, f"name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.{kind}\n")
    opened = _count_reads_of(data.name, monkeypatch)
    report = validate_manifest(path)
    line = 6 + len(header.splitlines())  # the sixth row
    too_many = (
        f"{data}:{line}: the manifest expands to more than 5 jobs; split it "
        "(allowed: at most 5 jobs per manifest)"
    )
    # Nothing read past the buffer that held the row that passed the limit (the file: ~70 kB).
    upto = len("".join(data.read_text().splitlines(keepends=True)[:line]))
    assert len(opened) == 1
    assert not opened[0].complete
    assert opened[0].read_so_far().length <= upto + 2 * io.DEFAULT_BUFFER_SIZE < data.stat().st_size
    assert [str(i) for i in report.errors if "more than 5 jobs" in str(i)] == [too_many]
    assert report.job_count <= 5
    with pytest.raises(ManifestError, match="more than 5 jobs"):
        list(iter_valid_jobs(path))
    assert len(opened) == 2  # validated again: refused before the rows are read a second time
    assert all(not f.complete and f.read_so_far().length <= upto + 2 * io.DEFAULT_BUFFER_SIZE for f in opened)


def test_the_row_limit_counts_the_items_and_the_matrix_combinations(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 items and 3 rows × 2 combinations is 10 jobs, the limit: taken. One row more is 12."""
    _lower_the_job_limit(monkeypatch, 10)
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    path = write(
        folder,
        "name: x\nendpoint: fal-ai/wan-22\nmatrix:\n  seed: [1, 2]\n"
        "items:\n  - prompt: a\n  - prompt: b\nitems_from: rows.jsonl\n",
    )
    report = validate_manifest(path)
    assert report.ok, [str(i) for i in report.issues]
    assert report.job_count == 10
    with data.open("a") as fh:
        fh.write("\n" + json.dumps({"prompt": "p3"}) + "\n")  # a blank line is no row
    report = validate_manifest(path)
    assert [str(i) for i in report.errors] == [
        f"{data}:5: the manifest expands to more than 10 jobs; split it "
        "(allowed: at most 10 jobs per manifest: 5 items with the matrix's 2 combinations each)"
    ]


def test_the_job_limit_is_said_past_the_cap_on_errors_shown(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad rows fill the errors shown; the limit, reached after them, is still said."""
    _lower_the_job_limit(monkeypatch, 5)
    monkeypatch.setattr("jobs.manifest.report.MAX_ERRORS", 2)
    (folder / "rows.jsonl").write_text("{bad\n" * 100)
    report = validate_manifest(write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n"))
    messages = [i.message for i in report.errors]
    assert "the manifest expands to more than 5 jobs; split it" in messages
    assert "… and 3 more errors not shown (6 in all)" in messages


@pytest.mark.parametrize("rows", ["", "\n\n"])
def test_an_empty_items_from_file_is_a_manifest_without_items(folder: Path, rows: str) -> None:
    """0 jobs would make a batch that never finishes: refused like a manifest with no items."""
    (folder / "rows.jsonl").write_text(rows)
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n")
    report = validate_manifest(path)
    assert [str(i) for i in report.errors] == [
        f"{path}:3: field 'items_from': the manifest has no items: its items_from file holds no rows "
        "(allowed: at least one item, in 'items:' or as a row of the items_from file)"
    ]
    with pytest.raises(ManifestError, match="has no items"):
        list(iter_valid_jobs(path))


def test_an_empty_items_list_says_there_are_no_items(folder: Path) -> None:
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems: []\n")
    (issue,) = validate_manifest(path).errors
    assert "the manifest has no items: 'items' is an empty list" in str(issue)
    assert "got a list" not in str(issue)


def test_an_empty_items_list_next_to_items_from_is_fine(folder: Path) -> None:
    (folder / "rows.jsonl").write_text('{"prompt": "hi"}\n')
    path = write(folder, "name: x\nendpoint: fal-ai/wan-22\nitems: []\nitems_from: rows.jsonl\n")
    report = validate_manifest(path)
    assert report.ok, report.errors
    assert report.job_count == 1


@pytest.mark.parametrize(
    ("text", "number"), [("1e2", 100.0), ("2.5E3", 2500.0), ("-3e-2", -0.03), ("1.0e+2", 100.0)]
)
def test_an_exponent_reads_as_a_number_as_in_yaml_1_2_and_json(text: str, number: float) -> None:
    """PyYAML (YAML 1.1) read ``1e2`` as text, so ``guide_scale: 1e2`` was "expected a number,
    got text '1e2'"; quoted it stays text."""
    root, _ = load_located(f"a: {text}\nb: '{text}'\n")
    assert root["a"] == number
    assert isinstance(root["a"], float)
    assert root["b"] == text


def test_a_number_field_takes_an_exponent(folder: Path) -> None:
    path = write(
        folder, "name: x\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: hi\n    guidance_scale: 35e-1\n"
    )
    report = validate_manifest(path)
    assert report.ok, [str(i) for i in report.errors]


# -- the issue caps: no number of warnings hides an error -----------------------------------------


def _dups_then_bad(folder: Path, duplicates: int, bad: int = 1) -> Path:
    """``duplicates`` identical rows (each a "runs once" warning), then ``bad`` rows with an error."""
    rows = ['{"prompt": "p"}'] * duplicates + [
        f'{{"prompt": "q{n}", "resolution": "1080p"}}' for n in range(bad)
    ]
    (folder / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return write(
        folder, "name: dtb\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\nbudget:\n  max_usd: 5\n"
    )


def test_warnings_beyond_the_cap_never_hide_an_error(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jobs.manifest.report.MAX_ISSUES", 3)
    report = validate_manifest(_dups_then_bad(folder, duplicates=8))
    (error,) = report.errors
    assert (Path(error.file).name, error.line, error.item, error.field) == ("rows.jsonl", 9, 8, "resolution")
    assert report.issues[0] == error  # errors come first
    assert len(report.warnings) == 4  # three kept, then the count of the others
    assert report.warnings[-1].message.endswith("more warnings not shown")
    assert all(i.severity == "warning" for i in report.issues[1:])


def test_errors_have_their_own_cap_and_say_how_many_there_are(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jobs.manifest.report.MAX_ISSUES", 1)
    monkeypatch.setattr("jobs.manifest.report.MAX_ERRORS", 2)
    report = validate_manifest(_dups_then_bad(folder, duplicates=3, bad=5))
    errors = report.errors
    assert [(e.line, e.field) for e in errors[:2]] == [(4, "resolution"), (5, "resolution")]
    assert errors[2].message == "… and 3 more errors not shown (5 in all)"
    assert report.issues[:3] == errors
    assert report.warnings[-1].message == "… and 1 more warnings not shown"


# -- YAML messages: one line, located, in the user's words ----------------------------------------


@pytest.mark.parametrize(("char", "code"), [("\x07", "U+0007"), ("\x00", "U+0000")])
def test_a_control_character_is_one_line_at_its_line_and_column(folder: Path, char: str, code: str) -> None:
    path = write(folder, f"name: t\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: a{char}b\n")
    (issue,) = validate_manifest(path).issues
    assert issue.line == 4
    assert (
        issue.message
        == f"not valid YAML: the character {code} at column 14: control characters are not allowed"
    )
    assert "\n" not in str(issue)


def test_a_duplicate_anchor_is_said_plainly(folder: Path) -> None:
    path = write(folder, "name: &a t\nendpoint: &a fal-ai/wan-22\nitems:\n  - prompt: *a\n")
    (issue,) = validate_manifest(path).issues
    assert issue.line == 2
    assert issue.message == "not valid YAML: found duplicate anchor 'a' (first defined on line 1)"


def test_an_image_given_as_a_list_names_no_internal_class(folder: Path) -> None:
    path = write(folder, "name: t\nendpoint: fal-ai/wan-i2v\nitems:\n  - prompt: x\n    image_url: [a.png]\n")
    (issue,) = validate_manifest(path).errors
    assert (issue.line, issue.field) == (5, "image_url")
    assert "expected text, got a list" in issue.message
    assert "LList" not in issue.message


def test_a_default_written_out_is_named_as_yaml_would_read_it(folder: Path) -> None:
    """Wan 2.6's default ``negative_prompt`` is empty: the warning named it ``negative_prompt:``
    and a blank, which reads as null, and its ``duration`` default, the text ``"5"``, as a
    number."""
    path = write(
        folder,
        "name: d\nendpoint: wan/v2.6/image-to-video\nitems:\n"
        "  - {prompt: same, image_url: b.jpg, seed: 7, negative_prompt: '', duration: '5'}\n"
        "  - {prompt: same, image_url: b.jpg, seed: 7}\n",
    )
    report = validate_manifest(path)
    (warning,) = [w for w in report.warnings if "differ only by" in w.message]
    assert 'they differ only by duration: "5", negative_prompt: "" (the endpoint' in warning.message
