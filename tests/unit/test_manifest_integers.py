"""Whole numbers in a YAML manifest are decimal, as in YAML 1.2, a CSV cell and ``--vary``.

PyYAML's YAML 1.1 resolver read ``seed: 0042`` as octal 34 and ``010`` as 8 without a word,
``0x10`` as 16 and ``1_000`` as 1000, while the same ``0042`` in an ``items_from`` CSV or in
``rerun --vary seed=0042`` gave 42: one text, two seeds, and the batch paid for the other one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from jobs.endpoints import get_endpoint
from jobs.manifest import load_manifest, validate_manifest
from jobs.vary import typed
from jobs.yaml_lines import load_located

UINT64_MAX = 18446744073709551615


def value_of(text: str) -> Any:
    root, _ = load_located(f"a: {text}\n")
    return root["a"]


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("0042", 42),
        ("010", 10),
        ("09", 9),
        ("-0012", -12),
        ("+7", 7),
        ("0", 0),
        ("-0", 0),
        ("42", 42),
        (str(UINT64_MAX), UINT64_MAX),
        ("0" + str(UINT64_MAX), UINT64_MAX),
    ],
)
def test_a_whole_number_is_decimal_leading_zeros_and_all(text: str, number: int) -> None:
    value = value_of(text)
    assert value == number
    assert type(value) is int


@pytest.mark.parametrize("text", ["0x10", "0o17", "0b11", "1_000", "-0x1F", "1:30", "0_42"])
def test_other_yaml_1_1_integer_spellings_stay_the_text_written(text: str) -> None:
    assert value_of(text) == text


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("false", False),
        ("null", None),
        ("~", None),
        ("1.5", 1.5),
        ("0042.5", 42.5),
        ("1e2", 100.0),
        ("-2.5E-1", -0.25),
        ("'0042'", "0042"),
        ('"010"', "010"),
        ("!!int '0042'", 42),
        ("!!int 0x10", "0x10"),
    ],
)
def test_booleans_null_floats_quotes_and_tags_are_read_as_before(text: str, value: object) -> None:
    got = value_of(text)
    assert got == value
    assert type(got) is type(value)


def write(folder: Path, text: str) -> Path:
    path = folder / "oct.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_zero_padded_seeds_are_the_numbers_written(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "name: oct\nendpoint: fal-ai/wan-22\ndefaults: {resolution: 480p}\n"
        f"matrix: {{seed: [0042, 010, 09, {UINT64_MAX}]}}\nitems: [{{prompt: x}}]\n",
    )
    report = validate_manifest(path)
    assert report.ok, [str(i) for i in report.issues]
    assert report.issues == []
    assert [job.input["seed"] for job in load_manifest(path).jobs()] == [42, 10, 9, UINT64_MAX]


@pytest.mark.parametrize("written", ["0x10", "0o17", "1_000", "0b11"])
def test_a_non_decimal_seed_is_a_located_error_not_another_number(tmp_path: Path, written: str) -> None:
    path = write(
        tmp_path,
        "name: oct\nendpoint: fal-ai/wan-22\ndefaults: {resolution: 480p}\n"
        f"matrix: {{seed: [1, {written}]}}\nitems:\n  - prompt: x\n    num_frames: {written}\n",
    )
    errors = validate_manifest(path).errors
    assert sorted((Path(e.file).name, e.line, e.item, e.field) for e in errors) == [
        ("oct.yaml", 4, 0, "seed"),
        ("oct.yaml", 7, 0, "num_frames"),
    ]
    for error in errors:
        assert error.message == f"expected an integer, got text {written!r}"
    seed = next(str(e) for e in errors if e.field == "seed")
    assert seed.startswith(f"{path}:4: item 0: field 'seed': expected an integer, got text '{written}'")


@pytest.mark.parametrize("written", ["0042", "010", "09", "+7", "0x10", "1_000", "0o17"])
def test_the_same_text_is_the_same_seed_in_yaml_csv_and_vary(tmp_path: Path, written: str) -> None:
    (tmp_path / "rows.csv").write_text(f"prompt,seed\nx,{written}\n", encoding="utf-8")
    yaml_path = write(
        tmp_path, f"name: y\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: x\n    seed: {written}\n"
    )
    csv_path = tmp_path / "c.yaml"
    csv_path.write_text("name: c\nendpoint: fal-ai/wan-22\nitems_from: rows.csv\n", encoding="utf-8")

    def seed_of(path: Path) -> object:
        (job,) = load_manifest(path).jobs()
        return job.input["seed"]

    seed_field = get_endpoint("fal-ai/wan-22").field("seed")
    assert seed_field is not None
    from_vary = typed(seed_field, written)
    assert seed_of(yaml_path) == seed_of(csv_path) == from_vary
    assert validate_manifest(yaml_path).ok is validate_manifest(csv_path).ok is isinstance(from_vary, int)
