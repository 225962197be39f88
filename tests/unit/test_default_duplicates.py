"""Jobs whose keys differ only because one writes out an endpoint default another leaves out:
kept (their keys are what was written), with one warning per group at every command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.manifest import validate_manifest, with_defaults, written_defaults
from tests.in_process import run_main

IMAGES = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images"
HEAD = "name: dup\nendpoint: fal-ai/wan-i2v\n"
ITEM = "prompt: A lighthouse at dusk, image_url: images/landscape.jpg"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copytree(IMAGES, tmp_path / "images")
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "m.yaml"
    path.write_text(HEAD + text)
    return path


def warnings_of(path: Path) -> list[str]:
    return [w.message for w in validate_manifest(path).warnings]


def test_written_defaults_name_the_fields_that_fill_in_the_same() -> None:
    written = {"prompt": "a", "seed": 1, "resolution": "720p", "num_frames": 81, "shift": 4}
    assert written_defaults("fal-ai/wan-i2v", written) == ["num_frames", "resolution"]
    left_out = {"prompt": "a", "seed": 1, "shift": 4}
    assert with_defaults("fal-ai/wan-i2v", written) == with_defaults("fal-ai/wan-i2v", left_out)
    assert written_defaults("no/such-endpoint", written) == []


def test_a_written_default_is_two_jobs_and_one_warning(folder: Path) -> None:
    path = write(
        folder,
        f"items:\n  - {{{ITEM}, seed: 1}}\n  - {{{ITEM}, seed: 1, resolution: 720p, num_frames: 81}}\n",
    )
    report = validate_manifest(path)
    assert (report.ok, report.job_count) == (True, 2)
    (warning,) = report.warnings
    assert (warning.item, warning.line) == (1, 5)
    assert "asks what item 0 (" in warning.message
    assert "m.yaml:4)" in warning.message
    assert "num_frames: 81, resolution: 720p (the endpoint's defaults)" in warning.message
    assert "both are sent and billed and should render the same video" in warning.message


def test_a_group_is_one_warning_naming_every_item(folder: Path) -> None:
    """Items without a pinned seed, or with another seed, are other requests: not named."""
    path = write(
        folder,
        f"items:\n  - {{{ITEM}, seed: 1}}\n  - {{{ITEM}, seed: 1, resolution: 720p}}\n"
        f"  - {{{ITEM}, seed: 1, num_frames: 81}}\n  - {{{ITEM}, seed: 1, resolution: 480p}}\n"
        f"  - {{{ITEM}}}\n  - {{{ITEM}, resolution: 720p}}\n  - {{{ITEM}, seed: 2, resolution: 720p}}\n",
    )
    (message,) = warnings_of(path)
    assert message.startswith("asks what item 0 (")
    assert "as does item 2 (" in message
    assert "all 3 are sent and billed" in message
    assert "num_frames: 81, resolution: 720p" in message


def test_a_sweep_through_the_default_is_a_duplicate_pair(folder: Path) -> None:
    """``resolution: [480p, 720p, null]``: 720p is the default, and null leaves it out."""
    path = write(folder, f"matrix:\n  resolution: [480p, 720p, null]\nitems:\n  - {{{ITEM}, seed: 1}}\n")
    report = validate_manifest(path)
    assert report.job_count == 3
    (message,) = [w.message for w in report.warnings]
    assert message.startswith("with resolution=None, asks what item 0 (")
    assert "m.yaml:6) with resolution='720p' asks" in message


def test_validate_says_it_as_text_and_in_json(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(folder)
    write(folder, f"items:\n  - {{{ITEM}, seed: 1}}\n  - {{{ITEM}, seed: 1, resolution: 720p}}\n")
    assert run_main(["validate", "m.yaml"], monkeypatch) == 0
    out, err = capsys.readouterr()
    assert "2 job(s), all valid" in out + err
    assert "m.yaml:5: item 1: asks what item 0 (m.yaml:4) asks" in err
    assert "resolution: 720p (the endpoint's defaults)" in err
    assert run_main(["validate", "--json", "m.yaml"], monkeypatch) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["jobs"] == 2
    [issue] = report["issues"]
    assert (issue["severity"], issue["item"], issue["line"]) == ("warning", 1, 5)
    assert "should render the same video" in issue["message"]
