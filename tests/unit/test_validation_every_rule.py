"""Validation says every rule a line breaks, every warning, and every plain "did you mean".

Found by a schema audit:

- a ``defaults`` value two endpoints refuse for different reasons was said once, with the first
  endpoint's allowed values only (a shared line's issues were de-duplicated by their message,
  leaving out what is allowed): taking its advice failed on the second run for the other one;
- ``estimate`` said only the budget's warnings, in text and in ``--json``, not the others that
  ``validate`` says (an item asking what another asks, an image outside wanbatch's limits …);
- a field name, endpoint or key that differs only in case or blanks (``NUM_FRAMES``,
  ``FAL-AI/WAN-22``, ``ITEMS:``, ``MAX_USD``) got no "did you mean" (a near spelling is
  compared case-sensitively, and ``NUM_FRAMES`` shares no letter with ``num_frames``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jobs.errors import did_you_mean
from tests.in_process import run_main

IMAGES = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "images"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(IMAGES, tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run_main(args, monkeypatch)
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    return code, printed.out, printed.err


TWO_ENDPOINTS = """\
name: dd
endpoint: fal-ai/wan-22
defaults:
  resolution: 1080p
items:
  - prompt: a text-to-video job
  - endpoint: fal-ai/wan-i2v
    prompt: an image-to-video job
    image_url: images/landscape.jpg
"""


def test_a_default_two_endpoints_refuse_is_said_for_each(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "dd.yaml").write_text(TWO_ENDPOINTS)
    code, _out, err = run(["validate", "dd.yaml"], monkeypatch, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error ")]
    assert lines == [
        "error dd.yaml:4: item 0: field 'resolution': '1080p' is not one of the allowed values "
        "on fal-ai/wan-22 (allowed: 480p, 580p, 720p)",
        "error dd.yaml:4: item 1: field 'resolution': '1080p' is not one of the allowed values "
        "on fal-ai/wan-i2v (allowed: 480p, 720p)",
    ]
    assert "2 error(s)" in err
    code, out, _err = run(["validate", "--json", "dd.yaml"], monkeypatch, capsys)
    assert code == 2
    issues = json.loads(out)["issues"]
    assert [(i["item"], i["allowed"]) for i in issues] == [(0, "480p, 580p, 720p"), (1, "480p, 720p")]


def test_a_default_one_endpoint_refuses_for_many_items_is_said_once(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same rule broken by every item is one line, as before, without an endpoint to tell apart."""
    (folder / "one.yaml").write_text(
        "name: one\nendpoint: fal-ai/wan-22\ndefaults:\n  resolution: 1080p\n"
        "items:\n  - prompt: a\n  - prompt: b\n  - prompt: c\n"
    )
    code, _out, err = run(["validate", "one.yaml"], monkeypatch, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error ")]
    assert lines == [
        "error one.yaml:4: item 0: field 'resolution': '1080p' is not one of the allowed values "
        "(allowed: 480p, 580p, 720p)"
    ]


WARNED = """\
name: ej
endpoint: fal-ai/wan-i2v
items:
  - {prompt: a, image_url: images/landscape.jpg, seed: 1}
  - {prompt: a, image_url: images/landscape.jpg, seed: 1, resolution: 720p}
  - {prompt: a, image_url: images/landscape.jpg, seed: 1}
"""


def test_estimate_says_every_warning_validate_says(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "ej.yaml").write_text(WARNED)
    code, _out, validated = run(["validate", "ej.yaml"], monkeypatch, capsys)
    assert code == 0
    warned = [line for line in validated.splitlines() if line.startswith("warning ")]
    assert len(warned) == 2
    assert "item 1: asks what item 0 (ej.yaml:4) asks" in warned[0]
    assert "item 2: identical to the job of item 0" in warned[1]

    code, out, err = run(["estimate", "ej.yaml"], monkeypatch, capsys)
    assert code == 0
    assert "Estimate for ej.yaml" in out
    assert [line for line in err.splitlines() if line.startswith("warning ")] == warned

    code, out, err = run(["estimate", "--json", "ej.yaml"], monkeypatch, capsys)
    assert code == 0
    data = json.loads(out)
    assert data["jobs"] == 2
    assert data["budget_warnings"] == []  # kept as it was: the budget's own
    assert ["warning " + w for w in data["warnings"]] == warned
    assert [line for line in err.splitlines() if line.startswith("warning ")] == warned  # stderr too


def test_estimate_json_lists_budget_warnings_among_warnings(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "b.yaml").write_text(
        "name: b\nendpoint: fal-ai/wan-i2v\nbudget:\n  max_usd: 0.01\n"
        "items:\n  - {prompt: a, image_url: images/landscape.jpg}\n"
    )
    code, out, _err = run(["estimate", "--json", "b.yaml"], monkeypatch, capsys)
    assert code == 0
    data = json.loads(out)
    (budget,) = data["budget_warnings"]
    (line,) = data["warnings"]
    assert budget in line
    assert "budget.max_usd" in line


def test_did_you_mean_the_same_but_for_case_or_blanks() -> None:
    assert did_you_mean("NUM_FRAMES", ["prompt", "num_frames"]) == " (did you mean 'num_frames'?)"
    assert did_you_mean("FAL-AI/WAN-22", ["fal-ai/wan-i2v", "fal-ai/wan-22"]) == (
        " (did you mean 'fal-ai/wan-22'?)"
    )
    assert did_you_mean(" Max_USD ", ["max_usd"]) == " (did you mean 'max_usd'?)"
    # Unchanged: a near spelling with other numbers is another thing.
    assert did_you_mean("fal-ai/wan-25", ["fal-ai/wan-22"]) == ""
    assert did_you_mean("NOTHING", ["seed"]) == ""


CASED = """\
NAME: x
name: x
ENDPOINT: fal-ai/wan-22
endpoint: FAL-AI/WAN-22
budget:
  MAX_USD: 3
ITEMS: []
items:
  - {prompt: a, NUM_FRAMES: 81, SEED: 1, Guidance_Scale: 3.5}
"""


def test_validate_suggests_names_that_differ_only_in_case(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (folder / "c.yaml").write_text(CASED)
    code, _out, err = run(["validate", "c.yaml"], monkeypatch, capsys)
    assert code == 2
    for wrong, right in (
        ("unknown top-level key 'NAME'", "name"),
        ("unknown top-level key 'ENDPOINT'", "endpoint"),
        ("unknown top-level key 'ITEMS'", "items"),
        ("unknown budget key 'MAX_USD'", "max_usd"),
        ("unknown endpoint 'FAL-AI/WAN-22'", "fal-ai/wan-22"),
    ):
        (line,) = [line for line in err.splitlines() if wrong in line]
        assert f"{wrong} (did you mean '{right}'?)" in line, line

    (folder / "f.yaml").write_text(
        "name: f\nendpoint: fal-ai/wan-22\n"
        "items:\n  - {prompt: a, NUM_FRAMES: 81, SEED: 1, Guidance_Scale: 3.5}\n"
    )
    code, _out, err = run(["validate", "f.yaml"], monkeypatch, capsys)
    assert code == 2
    fields = (("NUM_FRAMES", "num_frames"), ("SEED", "seed"), ("Guidance_Scale", "guidance_scale"))
    for wrong, right in fields:
        (line,) = [line for line in err.splitlines() if f"unknown field {wrong!r}" in line]
        assert f"(did you mean '{right}'?)" in line, line
