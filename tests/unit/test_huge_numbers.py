"""Whole numbers too long for Python's int/str conversion (4,300 digits) or for a float, in
every place a number comes from: YAML (leading zeros too), ``items_from`` JSONL and CSV, and
``--vary``. Each was an internal error (exit 70); each is now a located validation error."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.digits import TOO_MANY_DIGITS
from jobs.endpoints import get_endpoint
from jobs.errors import Issue, UsageError
from jobs.manifest import validate_manifest
from jobs.vary import checked_values, parse_vary
from jobs.yaml_lines import YamlProblem, load_located

BIG = "9" * 5000
#: Octal in YAML 1.1; decimal now, and too long all the same (hex is text, see below).
ZEROS = "0" + "7" * 4000
HEX = "0x" + "f" * 4000
HEAD = "name: x\nendpoint: fal-ai/wan-22\n"


def errors_of(folder: Path, text: str) -> list[str]:
    return [str(issue) for issue in issues_of(folder, text)]


def issues_of(folder: Path, text: str) -> list[Issue]:
    path = folder / "m.yaml"
    path.write_text(text, encoding="utf-8")
    return validate_manifest(path).errors


SEED_ALLOWED = "an integer from 0 to 18446744073709551615"


@pytest.mark.parametrize(
    "written", [BIG, ZEROS, "1" + "0" * 400, "-" + BIG], ids=["dec", "zeros", "10**400", "neg"]
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
        f"items:\n  - prompt: a\n    seed: {ZEROS}\n",
        f"items:\n  - prompt: a\n    foo: {ZEROS}\n",
        f"items:\n  - prompt: a\n    guidance_scale: 1{'0' * 400}\n",
        f"budget:\n  max_usd: 1{'0' * 400}\nitems:\n  - prompt: a\n",
        f"matrix:\n  seed: [1, {ZEROS}]\nitems:\n  - prompt: a\n",
    ],
)
def test_a_manifest_with_such_a_number_is_a_located_error(tmp_path: Path, body: str) -> None:
    errors = errors_of(tmp_path, HEAD + body)
    assert len(errors) == 1
    assert "m.yaml:" in errors[0]
    assert TOO_MANY_DIGITS in errors[0]


def test_a_long_hex_is_text_that_an_integer_field_refuses_at_its_line(tmp_path: Path) -> None:
    """YAML 1.1 read ``0x…`` as a number (and its digits were counted); a manifest reads whole
    numbers in decimal only, so it is text, never converted, and refused as such."""
    root, _ = load_located(f"a: 1\nb: {HEX}\n")
    assert root["b"] == HEX
    (issue,) = issues_of(tmp_path, HEAD + f"items:\n  - prompt: a\n    seed: {HEX}\n")
    assert (issue.line, issue.item, issue.field) == (5, 0, "seed")
    assert issue.message.startswith("expected an integer, got text '0xfff")


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


@pytest.mark.parametrize(
    ("body", "where"),
    [
        # (line, item, field, allowed): it said the file and line only.
        (f"items:\n  - prompt: a\n    seed: {'1' * 150}\n", (5, 0, "seed", SEED_ALLOWED)),
        (f"items:\n  - prompt: a\n  - prompt: b\n    seed: {BIG}\n", (6, 1, "seed", SEED_ALLOWED)),
        (f"items:\n  - {{prompt: a, num_frames: {ZEROS}}}\n", (4, 0, "num_frames", "an integer from 81 to")),
        (f"defaults:\n  seed: {BIG}\nitems:\n  - prompt: a\n", (4, None, "defaults.seed", SEED_ALLOWED)),
        (f"matrix:\n  seed: [1, {BIG}]\nitems:\n  - prompt: a\n", (4, None, "matrix.seed[1]", SEED_ALLOWED)),
        (
            f"budget:\n  max_usd: {BIG}\nitems:\n  - prompt: a\n",
            (4, None, "budget.max_usd", "a positive number"),
        ),
        (
            f"items:\n  - prompt: a\n    foo: {{bar: [{BIG}]}}\n",
            (5, 0, "foo.bar[0]", "a whole number of at most 100 digits"),
        ),
    ],
    ids=["seed-150", "second-item", "zeros", "defaults", "matrix", "budget", "nested"],
)
def test_a_yaml_number_of_too_many_digits_names_its_item_and_field(
    tmp_path: Path, body: str, where: tuple[int, int | None, str, str]
) -> None:
    # Said once; other errors are said too ("nested": the unknown field 'foo').
    (issue,) = [i for i in issues_of(tmp_path, HEAD + body) if i.message == TOO_MANY_DIGITS]
    assert (issue.line, issue.item, issue.field, issue.message) == (*where[:3], TOO_MANY_DIGITS)
    assert issue.allowed is not None
    assert issue.allowed.startswith(where[3])


def test_every_yaml_number_of_too_many_digits_is_named(tmp_path: Path) -> None:
    issues = issues_of(
        tmp_path, HEAD + f"items:\n  - {{prompt: a, seed: {BIG}}}\n  - {{prompt: b, seed: {BIG}}}\n"
    )
    assert [(i.line, i.item, i.field) for i in issues] == [(4, 0, "seed"), (5, 1, "seed")]


@pytest.mark.parametrize(
    ("rows", "name", "field", "allowed"),
    [
        # More than Python's 4,300: it said "not valid JSON (… use sys.set_int_max_str_digits() …)".
        (f'{{"prompt": "a", "seed": {BIG}}}\n', "rows.jsonl", "seed", SEED_ALLOWED),
        (f'{{"prompt": "a", "seed": -{"9" * 400}}}\n', "rows.jsonl", "seed", SEED_ALLOWED),
        (
            f'{{"prompt": "a", "x": {{"y": [1, {BIG}]}}}}\n',
            "rows.jsonl",
            "x.y[1]",
            "a whole number of at most 100",
        ),
        (f"prompt,seed\na,{BIG}\n", "rows.csv", "seed", SEED_ALLOWED),
    ],
    ids=["jsonl-5000", "jsonl-400", "jsonl-nested", "csv"],
)
def test_an_items_from_number_of_too_many_digits_names_its_field(
    tmp_path: Path, rows: str, name: str, field: str, allowed: str
) -> None:
    (tmp_path / name).write_text(rows + '{"prompt": "b"}\n' * (name == "rows.jsonl"), encoding="utf-8")
    (issue,) = issues_of(tmp_path, HEAD + f"items_from: {name}\n")
    assert (Path(issue.file).name, issue.line, issue.item, issue.field, issue.message) == (
        name,
        2 - (name == "rows.jsonl"),
        0,
        field,
        TOO_MANY_DIGITS,
    )
    assert issue.allowed is not None
    assert issue.allowed.startswith(allowed)
    assert "set_int_max_str_digits" not in str(issue)
