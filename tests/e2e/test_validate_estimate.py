"""Issue #2 end to end: `validate`, `submit` and `estimate` as a user runs them.

Every bad manifest of the corpus is refused by the CLI with exit code 2, a located message
(``file:line``, item and field where the corpus says) and no traceback, and `submit` writes
nothing at all; every shipped example validates; `estimate --json` gives exact figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import EXAMPLES, MakeManifest, Run, Wb, counts
from tests.unit.bad_manifest_corpus import CORPUS_FILES, expectations, generated_bad_manifests, wanted


def _assert_refused(run: Run, path: Path, expect: dict[str, str]) -> None:
    assert run.code == 2, f"{path.name}: exit {run.code}\n{run.stdout}\n{run.stderr}"
    both = run.stdout + run.stderr
    assert "Traceback" not in both, both
    must = wanted(path, expect)
    lines = run.stderr.splitlines()
    assert any(all(w in line for w in must) for line in lines), (
        f"{path.name}: no stderr line mentions all of {must}; stderr:\n{run.stderr}"
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict[str, str]]]:
    cases: list[tuple[Path, dict[str, str]]] = generated_bad_manifests(
        tmp_path_factory.mktemp("generated-bad")
    )
    return cases


@pytest.fixture(scope="module")
def shared_sqlite(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One database for every refusal: since none may write a row, sharing makes the check stronger."""
    return f"sqlite:///{tmp_path_factory.mktemp('refusals') / 'refusals.db'}"


@pytest.fixture
def refusal_db(shared_sqlite: str, monkeypatch: pytest.MonkeyPatch, wb: Wb) -> Iterator[str]:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", shared_sqlite)
    assert wb("status", "--json").code == 0  # creates and migrates the database first
    assert counts(shared_sqlite) == (0, 0)
    yield shared_sqlite
    assert counts(shared_sqlite) == (0, 0)


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_bad_manifest_refused_by_validate_and_submit(path: Path, wb: Wb, refusal_db: str) -> None:
    expect = expectations(path)
    _assert_refused(wb("validate", path), path, expect)
    submitted = wb("submit", path)
    _assert_refused(submitted, path, expect)
    assert "nothing was submitted" in submitted.stderr
    assert counts(refusal_db) == (0, 0)


def test_generated_big_bad_manifests_refused(
    generated: list[tuple[Path, dict[str, str]]], wb: Wb, refusal_db: str
) -> None:
    assert len(generated) == 3
    for path, expect in generated:
        _assert_refused(wb("validate", path), path, expect)
        _assert_refused(wb("submit", path), path, expect)
        assert counts(refusal_db) == (0, 0)


def test_bad_manifest_json_output_is_one_object(wb: Wb) -> None:
    path = next(p for p in CORPUS_FILES if p.stem == "unknown_field")
    run = wb("validate", path, "--json")
    assert run.code == 2
    data = run.json()
    assert data["ok"] is False
    assert any(i.get("field") == "promt" or "promt" in str(i) for i in data["issues"])


POSTGRES_SAMPLE = (
    "unknown_field",
    "bad_enum_resolution",
    "image_file_missing",
    "items_from_bad_jsonl",
    "no_items",
)


@pytest.fixture(scope="module")
def module_pg(new_pg_database: Callable[[], str]) -> str:
    return new_pg_database()


@pytest.mark.postgres
@pytest.mark.parametrize("stem", POSTGRES_SAMPLE)
def test_bad_manifest_submit_writes_nothing_on_postgresql(
    stem: str, module_pg: str, wb: Wb, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = next(p for p in CORPUS_FILES if p.stem == stem)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", module_pg)
    assert wb("status", "--json").code == 0
    before = counts(module_pg)
    assert before == (0, 0)
    _assert_refused(wb("submit", path), path, expectations(path))
    assert counts(module_pg) == (0, 0)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_validates(path: Path, wb: Wb) -> None:
    run = wb("validate", path, "--json")
    assert run.code == 0, run.stderr
    data = run.json()
    assert data["ok"] is True
    assert data["jobs"] >= 1
    assert wb("validate", path).code == 0


def _estimate(wb: Wb, path: Path) -> dict[str, object]:
    run = wb("estimate", path, "--json")
    assert run.code == 0, run.stderr
    data: dict[str, object] = run.json()
    return data


@pytest.mark.parametrize(
    ("endpoint", "fields", "units", "unit", "usd"),
    [
        ("fal-ai/wan-i2v", "resolution: 480p\n    num_frames: 81", 0.5, "unit", 0.2),
        ("fal-ai/wan-i2v", "resolution: 720p\n    num_frames: 100", 1.25, "unit", 0.5),
        ("fal-ai/wan-25-preview/image-to-video", 'resolution: 1080p\n    duration: "10"', 10, "s", 1.5),
    ],
    ids=["i2v-480p-81", "i2v-720p-100", "wan25-1080p-10s"],
)
def test_estimate_exact_figures(
    endpoint: str, fields: str, units: float, unit: str, usd: float, wb: Wb, manifest: MakeManifest
) -> None:
    path = manifest(
        "one",
        f"name: one\nendpoint: {endpoint}\nitems:\n  - prompt: a mountain\n"
        f"    image_url: images/landscape.jpg\n    {fields}\n",
    )
    data = _estimate(wb, path)
    assert data["jobs"] == 1
    assert data["billing_units"] == pytest.approx(units, abs=0)
    assert data["usd"] == pytest.approx(usd, abs=1e-9)
    assert data["billing_units_by_unit"] == {unit: units}
    assert data["by_endpoint"] == {endpoint: {"jobs": 1, "billing_units": units, "unit": unit, "usd": usd}}


def test_estimate_of_the_sweep_example(wb: Wb, examples_copy: Path) -> None:
    data = _estimate(wb, examples_copy / "seed-resolution-sweep.yaml")
    assert (data["jobs"], data["billing_units"], data["usd"]) == (6, 4.5, 1.8)
    assert data["by_endpoint"] == {
        "fal-ai/wan-i2v": {"jobs": 6, "billing_units": 4.5, "unit": "unit", "usd": 1.8}
    }
    human = wb("estimate", examples_copy / "seed-resolution-sweep.yaml")
    assert human.code == 0
    assert "$1.80" in human.stdout


MIXED_UNITS = """name: mixed-units
endpoint: fal-ai/wan-i2v
items:
  - prompt: a mountain
    image_url: images/landscape.jpg
    resolution: 720p
  - prompt: a mountain
    image_url: images/landscape.jpg
    resolution: 480p
  - endpoint: fal-ai/wan-25-preview/image-to-video
    prompt: a mountain
    image_url: images/landscape.jpg
    resolution: 720p
    duration: "10"
  - endpoint: fal-ai/wan-22
    prompt: a mountain
    resolution: 480p
    num_frames: 81
"""


def test_estimate_adds_units_only_of_one_kind(wb: Wb, manifest: MakeManifest) -> None:
    """Seconds of video and per-video units are not added into one number; dollars are."""
    path = manifest("mixed", MIXED_UNITS)
    data = _estimate(wb, path)
    assert data["jobs"] == 4
    assert data["billing_units"] is None  # 10 s + 5.0625 s + 1.5 units is no number
    assert data["billing_units_by_unit"] == {"s": 15.0625, "unit": 1.5}
    assert data["usd"] == pytest.approx(0.4 + 0.2 + 1.0 + 0.2025, abs=1e-9)
    by_endpoint = data["by_endpoint"]
    assert isinstance(by_endpoint, dict)
    assert by_endpoint["fal-ai/wan-i2v"] == {"jobs": 2, "billing_units": 1.5, "unit": "unit", "usd": 0.6}
    assert by_endpoint["fal-ai/wan-22"]["unit"] == "s"
    human = wb("estimate", path)
    assert human.code == 0, human.stderr
    [total] = [line for line in human.stdout.splitlines() if line.startswith("total")]
    assert "15.0625 s + 1.5 units" in total
    assert "16.5625" not in human.stdout
    assert "$1.80" in total
