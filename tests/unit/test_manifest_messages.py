"""Validation messages that misled: a "did you mean" naming another model, and one number too
long hiding every other error of the manifest (audit, new user)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.digits import TOO_MANY_DIGITS
from jobs.endpoints import known_endpoint_ids
from jobs.errors import Issue, did_you_mean
from jobs.manifest import validate_manifest
from jobs.manifest.loading import _zone_hint

LONG = "9" * 110


def errors_of(folder: Path, text: str) -> list[Issue]:
    path = folder / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return validate_manifest(path).errors


@pytest.mark.parametrize(
    "written", ["fal-ai/wan-25", "fal-ai/wan-26", "fal-ai/wan-21", "wan/v2.5/image-to-video"]
)
def test_an_endpoint_with_other_numbers_gets_no_suggestion_but_the_list(tmp_path: Path, written: str) -> None:
    """Another version is another model: "did you mean 'fal-ai/wan-22'?" sent users to it."""
    top = f"name: x\nendpoint: {written}\nitems:\n  - {{prompt: a}}\n"
    own = f"name: x\nendpoint: fal-ai/wan-22\nitems:\n  - {{prompt: a, endpoint: {written}}}\n"
    for text in (top, own):
        (issue,) = errors_of(tmp_path, text)
        assert issue.message == f"unknown endpoint {written!r}"
        assert issue.allowed == ", ".join(known_endpoint_ids())


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("fal-ai/wan22", "fal-ai/wan-22"),
        ("fal-ai/wan-i2V", "fal-ai/wan-i2v"),
        ("wan/v2.6/image-to-vidoe", "wan/v2.6/image-to-video"),
    ],
)
def test_an_endpoint_misspelt_with_the_same_numbers_is_suggested(
    tmp_path: Path, written: str, meant: str
) -> None:
    (issue,) = errors_of(tmp_path, f"name: x\nendpoint: {written}\nitems:\n  - {{prompt: a}}\n")
    assert issue.message == f"unknown endpoint {written!r} (did you mean {meant!r}?)"


def test_every_hint_keeps_to_the_same_numbers() -> None:
    """Field names and time zones too: guidance_scale_3 is no typo of guidance_scale_2."""
    assert did_you_mean("guidance_scale_3", ["guidance_scale", "guidance_scale_2"]) == ""
    assert did_you_mean("guidance_scale2", ["guidance_scale", "guidance_scale_2"]) == (
        " (did you mean 'guidance_scale_2'?)"
    )
    assert did_you_mean("num_frame", ["num_frames", "seed"]) == " (did you mean 'num_frames'?)"
    assert "Etc/GMT+3" not in _zone_hint("Etc/GMT+13")
    assert _zone_hint("Europe/Berln") == " (did you mean 'Europe/Berlin'?)"


NUMS = f"""name: nums
endpoint: fal-ai/wan-22
items:
  - {{prompt: a, seed: 0x51}}
  - {{prompt: b, seed: {LONG}}}
  - {{prompt: c, num_frames: 100.5}}
"""


def test_a_number_too_long_is_one_error_among_the_others(tmp_path: Path) -> None:
    """It was the only error said: validation stopped at it, and the others came one run later."""
    found = [(i.line, i.item, i.field, i.message.split(" (")[0]) for i in errors_of(tmp_path, NUMS)]
    assert found == [
        (4, 0, "seed", "expected an integer, got text '0x51'"),
        (5, 1, "seed", TOO_MANY_DIGITS),
        (6, 2, "num_frames", "expected an integer, got float 100.5"),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (f"name: {LONG}\nendpoint: fal-ai/wan-22\n", "name"),
        (f"name: x\nendpoint: {LONG}\n", "endpoint"),
        (f"name: x\nendpoint: fal-ai/wan-22\ndefaults: {{seed: {LONG}}}\n", "defaults.seed"),
        (f"name: x\nendpoint: fal-ai/wan-22\nmatrix: {{seed: [1, {LONG}]}}\n", "matrix.seed[1]"),
        (f"name: x\nendpoint: fal-ai/wan-22\nbudget: {{max_usd: {LONG}}}\n", "budget.max_usd"),
        (f"name: x\nendpoint: fal-ai/wan-22\nschedule: {{window: {LONG}}}\n", "schedule.window"),
        (f"name: x\nendpoint: fal-ai/wan-22\npriority: {LONG}\n", "priority"),
    ],
    ids=["name", "endpoint", "defaults", "matrix", "budget", "schedule", "priority"],
)
def test_a_number_too_long_anywhere_is_said_once_and_nothing_else_hides(
    tmp_path: Path, body: str, field: str
) -> None:
    """Said once (no "must be text, got …" about the same value), the item's error beside it."""
    issues = errors_of(tmp_path, body + "items:\n  - {prompt: a, num_frames: 5}\n  - {prompt: b}\n")
    long = [i for i in issues if i.message == TOO_MANY_DIGITS]
    assert [i.field for i in long] == [field]
    others = [i for i in issues if i not in long]
    if field == "endpoint":  # no endpoint, no fields to check
        assert others == []
    else:
        assert [(i.item, i.field) for i in others] == [(0, "num_frames")]
