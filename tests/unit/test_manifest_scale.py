"""Large sweeps: what makes a million-job manifest affordable must not change what is said.

A sweep (prompts × seeds × resolutions) repeats each of its few values across thousands of jobs:
``validate`` and ``estimate`` expand the manifest once (pricing as they validate), each distinct
plain value is checked once per pass (:class:`jobs.validation.ValueCache`), and the pass that
stores a validated manifest skips the warnings no one reads. Every job is still checked against
its endpoint's schema; an invalid value is still named at each item it reaches, with the very
same line as a pass that remembers nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import jobs.validation as validation
from jobs import estimates
from jobs.errors import ManifestError
from jobs.manifest import Manifest, validate_manifest
from jobs.settings import Settings
from jobs.validation import ValueCache

IMAGES = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copytree(IMAGES, tmp_path / "images")
    return tmp_path


def _settings(folder: Path) -> Settings:
    return Settings(database_url=f"sqlite:///{folder / 'unused.db'}")


def sweep(folder: Path, rows: list[dict[str, object]], seeds: str = "[1, 2, 3]") -> Path:
    """A prompts × seeds × resolutions sweep: ``rows`` in an items_from file, the matrix here."""
    (folder / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = folder / "m.yaml"
    path.write_text(
        "name: sweep\nendpoint: fal-ai/wan-22\n"
        "defaults:\n  num_frames: 81\n  enable_prompt_expansion: false\n"
        "items_from: rows.jsonl\n"
        f"matrix:\n  seed: {seeds}\n  resolution: [480p, 720p]\n"
        "budget:\n  max_usd: 1000\n"
    )
    return path


ROWS: list[dict[str, object]] = [
    {"prompt": "a lighthouse at dusk"},
    {"prompt": "a fox in the snow", "endpoint": "fal-ai/wan-i2v", "image_url": "images/night.jpg"},
    {"prompt": "a lighthouse at dusk", "num_frames": 500},  # out of range: each row says so
    {"prompt": "", "shift": 5},  # an empty prompt: refused at each row it is in
    {"prompt": "a lighthouse at dusk", "num_frames": 500},
    {"prompt": "a paper boat", "resolution": "1080p"},  # the matrix wins: a warning, then valid
    {"prompt": "a fox in the snow", "endpoint": "fal-ai/wan-i2v", "image_url": "images/missing.jpg"},
    {"prompt": "a fox in the snow", "endpoint": "fal-ai/wan-i2v", "image_url": "images/missing.jpg"},
]


def test_a_sweep_with_invalid_rows_names_each_one_as_a_pass_that_remembers_nothing(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = sweep(folder, ROWS)
    remembered = [str(issue) for issue in validate_manifest(path).issues]
    monkeypatch.setattr(ValueCache, "MAX_ENTRIES", 0)  # nothing remembered: every value checked anew
    assert [str(issue) for issue in validate_manifest(path).issues] == remembered
    errors = [line for line in remembered if "rows.jsonl" in line and "warning" not in line.lower()]
    # Each invalid row is named, once per row (its six jobs share the row's line and message).
    assert sum("num_frames" in line and "500 is out of range" in line for line in errors) == 2
    assert sum("prompt" in line and "must not be empty" in line for line in errors) == 1
    assert sum("missing.jpg" in line for line in errors) == 2
    assert any("rows.jsonl:3" in line for line in errors)
    assert any("rows.jsonl:5" in line for line in errors)


def test_invalid_seeds_of_a_matrix_are_said_as_before(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The varying field itself invalid for some jobs: a negative seed, a text one, a list."""
    path = sweep(folder, ROWS[:2], seeds='[1, -1, "x", [2, 3], 18446744073709551616, true]')
    remembered = [str(issue) for issue in validate_manifest(path).issues]
    monkeypatch.setattr(ValueCache, "MAX_ENTRIES", 0)
    assert [str(issue) for issue in validate_manifest(path).issues] == remembered
    assert sum("seed" in line for line in remembered) >= 5


def test_each_distinct_value_of_a_sweep_is_checked_once(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 prompts × 20 seeds × 2 resolutions: 12,000 jobs, a few hundred distinct values."""
    rows: list[dict[str, object]] = [{"prompt": f"take {i}"} for i in range(300)]
    path = sweep(folder, rows, seeds=json.dumps(list(range(20))))
    calls = 0
    check_value = validation.check_value

    def counted(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return check_value(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(validation, "check_value", counted)
    report = validate_manifest(path)
    assert (report.ok, report.job_count) == (True, 12_000)
    # prompts, seeds, resolutions, num_frames, enable_prompt_expansion: once each per endpoint
    assert calls <= 300 + 20 + 2 + 2


def test_the_value_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs.endpoints import get_endpoint

    monkeypatch.setattr(ValueCache, "MAX_ENTRIES", 10)
    monkeypatch.setattr(ValueCache, "MAX_CHARS", 50)
    cache = ValueCache()
    prompt = get_endpoint("fal-ai/wan-22").field("prompt")
    seed = get_endpoint("fal-ai/wan-22").field("seed")
    assert prompt is not None
    assert seed is not None
    for i in range(100):
        assert cache.check("fal-ai/wan-22", seed, i) == []
        assert cache.check("fal-ai/wan-22", prompt, f"a prompt of some length {i}") == []
    assert cache.check("fal-ai/wan-22", seed, -1)[0].message == "-1 is out of range"
    assert len(cache._verdicts) <= 10
    assert cache._chars <= 50


def test_estimate_expands_the_manifest_once(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = sweep(folder, ROWS[:2])
    passes = 0
    jobs = Manifest.jobs

    def counted(self: Manifest, *args: object, **kwargs: object) -> object:
        nonlocal passes
        passes += 1
        return jobs(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Manifest, "jobs", counted)
    report, totals = estimates.estimate_manifest(path, _settings(folder))
    assert passes == 1
    assert (report.job_count, totals.jobs) == (12, 12)


def test_estimate_prices_what_it_validated(folder: Path) -> None:
    """The one pass prices the jobs a second pass over the manifest gives: 6 text-to-video and
    6 image-to-video, at 480p and 720p."""
    from jobs.pricing import Totals, estimate_job

    path = sweep(folder, ROWS[:2])
    settings = _settings(folder)
    report, totals = estimates.estimate_manifest(path, settings)
    again = Totals()
    assert report.manifest is not None
    for job in report.manifest.jobs():
        again.add(estimate_job(job.endpoint, job.input, settings))
    assert totals.as_dict() == again.as_dict()
    assert {e: v["jobs"] for e, v in totals.as_dict()["by_endpoint"].items()} == {
        "fal-ai/wan-22": 6,
        "fal-ai/wan-i2v": 6,
    }


def test_estimate_of_an_invalid_sweep_refuses_without_pricing_the_invalid_jobs(folder: Path) -> None:
    """A resolution no price table has (``1080p`` on an item, no matrix): its job is never priced
    (pricing would raise), the manifest is refused with its located error."""
    (folder / "rows.jsonl").write_text(json.dumps({"prompt": "a", "resolution": "1080p"}) + "\n")
    path = folder / "m.yaml"
    path.write_text("name: bad\nendpoint: fal-ai/wan-22\nitems_from: rows.jsonl\n")
    with pytest.raises(ManifestError) as caught:
        estimates.estimate_manifest(path, _settings(folder))
    (error,) = [i for i in caught.value.issues if i.severity == "error"]
    assert (error.field, error.line) == ("resolution", 1)
    assert "1080p" in error.message


def test_the_sqlite_insert_names_the_columns_its_values_fill() -> None:
    """The chunk insert's statement is written out (no SQL built from strings): its columns are
    those whose values :func:`jobs.store.creating._insert_chunk_sqlite` converts, in order."""
    from jobs.store import creating

    columns = creating._SQLITE_INSERT.split("(", 1)[1].split(")", 1)[0]
    assert tuple(c.strip() for c in columns.split(",")) == creating._NEW_JOB_COLUMNS
    assert creating._SQLITE_INSERT.count("?") == len(creating._NEW_JOB_COLUMNS)


def _counting(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Count the calls of ``owner.name`` (a function, or a property's getter) from now on."""
    calls = [0]
    found = getattr(owner, "__dict__", {}).get(name, getattr(owner, name))
    if isinstance(found, property):
        getter = found.fget
        assert getter is not None

        def counted_get(self: object) -> object:
            calls[0] += 1
            return getter(self)

        monkeypatch.setattr(owner, name, property(counted_get))
        return calls

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return found(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_pass_works_out_the_manifests_folder_once_not_per_row(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest's folder is a new Path each time it is asked for: a million-row file asked
    for it twice a row and compared it with the row's folder each time (bench/RESULTS.md)."""
    rows: list[dict[str, object]] = [{"prompt": f"take {i}"} for i in range(300)]
    rows += [{"prompt": "a fox", "endpoint": "fal-ai/wan-i2v", "image_url": "images/night.jpg"}] * 2
    path = sweep(folder, rows)
    expected = [str(issue) for issue in validate_manifest(path).issues]
    calls = _counting(monkeypatch, Manifest, "base_dir")
    report = validate_manifest(path)
    assert (report.ok, report.job_count) == (True, 301 * 6)
    assert [str(issue) for issue in report.issues] == expected  # the repeated row's warnings
    assert calls[0] <= 10


def test_the_rows_of_a_jsonl_file_share_one_decoder(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``json.loads`` with hooks builds a decoder (and its scanner) for every row it is given."""
    import json as json_module

    rows: list[dict[str, object]] = [{"prompt": f"take {i}", "seed": i} for i in range(300)]
    path = sweep(folder, rows)
    built = _counting(monkeypatch, json_module.JSONDecoder, "__init__")
    report = validate_manifest(path)
    assert (report.ok, report.job_count) == (True, 300 * 6)
    assert built[0] <= 5
