"""Whole numbers too long for Python's int/str conversion (4,300 digits) or for a float, in
every place a number comes from: YAML (decimal and hex), ``items_from`` JSONL and CSV, and
``--vary``. Each was an internal error (exit 70); each is now a located validation error."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.digits import TOO_MANY_DIGITS
from jobs.endpoints import get_endpoint
from jobs.errors import UsageError
from jobs.manifest import validate_manifest
from jobs.vary import checked_values, parse_vary
from jobs.yaml_lines import YamlProblem, load_located

BIG = "9" * 5000
HEX = "0x" + "f" * 4000
HEAD = "name: x\nendpoint: fal-ai/wan-22\n"


def errors_of(folder: Path, text: str) -> list[str]:
    path = folder / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return [str(issue) for issue in validate_manifest(path).errors]


@pytest.mark.parametrize(
    "written", [BIG, HEX, "1" + "0" * 400, "-" + BIG], ids=["dec", "hex", "10**400", "neg"]
)
def test_yaml_refuses_a_whole_number_of_too_many_digits_at_its_line(written: str) -> None:
    with pytest.raises(YamlProblem) as refused:
        load_located(f"a: 1\nb: {written}\n")
    assert refused.value.line == 2
    assert TOO_MANY_DIGITS in str(refused.value)


@pytest.mark.parametrize(
    "body",
    [
        f"items:\n  - prompt: a\n    seed: {BIG}\n",
        f"items:\n  - prompt: a\n    seed: {HEX}\n",
        f"items:\n  - prompt: a\n    foo: {HEX}\n",
        f"items:\n  - prompt: a\n    guidance_scale: 1{'0' * 400}\n",
        f"budget:\n  max_usd: 1{'0' * 400}\nitems:\n  - prompt: a\n",
        f"matrix:\n  seed: [1, {HEX}]\nitems:\n  - prompt: a\n",
    ],
)
def test_a_manifest_with_such_a_number_is_a_located_error(tmp_path: Path, body: str) -> None:
    errors = errors_of(tmp_path, HEAD + body)
    assert len(errors) == 1
    assert "m.yaml:" in errors[0]
    assert TOO_MANY_DIGITS in errors[0]


def test_an_integer_field_without_a_maximum_still_refuses_what_no_provider_takes(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, HEAD + f"items:\n  - prompt: a\n    num_inference_steps: {10**40}\n")
    assert "num_inference_steps" in error
    assert "out of range" in error
    assert not errors_of(tmp_path, HEAD + "items:\n  - prompt: a\n    num_inference_steps: 40\n")


@pytest.mark.parametrize(
    ("rows", "name"),
    [
        (f'{{"prompt": "a", "seed": {"9" * 400}}}\n', "rows.jsonl"),
        (f'{{"prompt": "a", "guidance_scale": 1{"0" * 400}}}\n', "rows.jsonl"),
        (f"prompt,seed\na,{BIG}\n", "rows.csv"),
        (f"prompt,guidance_scale\na,{BIG}\n", "rows.csv"),
    ],
)
def test_items_from_rows_with_such_a_number_are_located_errors(tmp_path: Path, rows: str, name: str) -> None:
    (tmp_path / name).write_text(rows, encoding="utf-8")
    (error,) = errors_of(tmp_path, HEAD + f"items_from: {name}\n")
    assert f"{name}:" in error
    assert TOO_MANY_DIGITS in error


@pytest.mark.parametrize(
    "text", [f"num_inference_steps=1,{BIG}", f"guidance_scale=1{'0' * 400}", f"seed={BIG}"]
)
def test_vary_refuses_such_a_number_as_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match=TOO_MANY_DIGITS):
        checked_values(get_endpoint("fal-ai/wan-22"), parse_vary(text))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ('{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nesting deeper than 64 levels"),
        ('{"prompt": "a", "x": ' + "[" * 900 + "]" * 900 + "}", "nesting deeper than 64 levels"),
        ('{"prompt": "a\\ud800b"}', "lone UTF-16 surrogate"),
        ('{"prompt": "a", "\\udfff": 1}', "lone UTF-16 surrogate"),
    ],
    ids=["deep-100000", "deep-900", "surrogate", "surrogate-key"],
)
def test_jsonl_rows_too_deep_or_with_a_lone_surrogate_are_located_errors(
    tmp_path: Path, row: str, expected: str
) -> None:
    """Audit A4/A5: a deeply nested row was a RecursionError, a lone surrogate a
    UnicodeEncodeError; YAML already refused both. Rows after the bad one still load."""
    (tmp_path / "rows.jsonl").write_text(row + '\n{"prompt": "fine"}\n', encoding="utf-8")
    (error,) = errors_of(tmp_path, HEAD + "items_from: rows.jsonl\n")
    assert "rows.jsonl:1" in error
    assert expected in error
