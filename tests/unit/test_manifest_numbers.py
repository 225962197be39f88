"""One reading of numbers wherever a manifest writes them: YAML, ``items_from`` CSV and JSONL,
``rerun --vary`` and a schedule's window.

YAML 1.1 (PyYAML) read ``guidance_scale: 1_0.5`` as 10.5, ``1_000.0`` as 1000 and ``.inf`` as
an infinity, but ``+.5`` and ``-.5`` as text, while a CSV cell read ``1_0.5`` as text and ``+.5``
as 0.5, and ``--vary`` (Python's ``float()``) took ``1_0.5``, ``inf``, ``nan`` and ``٣.٥``. The
``\\d`` of the CSV, ``--vary`` and window patterns took other scripts' digits, which ``int()``
converts, so ``--vary seed=٣`` or a CSV seed ``٣`` was 3 where YAML refused it. A value of 5,000
characters was quoted whole in its one-line error, and ``--vary seed=1..<5,000 digits>`` was an
internal error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

import cli
from cli import startup
from jobs.digits import plain_number
from jobs.endpoints import get_endpoint
from jobs.errors import Issue, UsageError
from jobs.manifest import load_manifest, validate_manifest
from jobs.manifest.items_from import csv_value
from jobs.printable import quoted, shortened
from jobs.schedule import parse_window
from jobs.vary import checked_values, parse_vary, typed
from jobs.yaml_lines import load_located

SPEC = get_endpoint("fal-ai/wan-22")
HEAD = "name: n\nendpoint: fal-ai/wan-22\n"
SEED_ALLOWED = "an integer from 0 to 18446744073709551615"


def yaml_value(text: str) -> Any:
    root, _ = load_located(f"a: {text}\n")
    return root["a"]


def read_everywhere(field: str, text: str) -> list[str]:
    """``text`` as a YAML value, a CSV cell and a ``--vary`` value of ``field``, each as its repr
    (so a NaN compares equal to a NaN, and 1 differs from 1.0)."""
    fld = SPEC.field(field)
    assert fld is not None
    return [repr(yaml_value(text)), repr(csv_value(SPEC, field, text)), repr(typed(fld, text))]


#: Numbers: what every place reads them as.
NUMBERS = [
    ("1.5", 1.5),
    (".5", 0.5),
    ("+.5", 0.5),
    ("-.5", -0.5),
    ("5.", 5.0),
    ("0042.5", 42.5),
    ("1e3", 1000.0),
    ("1.5e+3", 1500.0),
    ("-2.5E-1", -0.25),
    ("42", 42),
    ("0042", 42),
]
#: Not numbers anywhere: the text written, which a number field refuses with its line.
NOT_NUMBERS = [
    "1_0.5",
    "1_000.0",
    "1__0.0",
    "0.1_",
    ".inf",
    "-.inf",
    ".Inf",
    ".nan",
    ".NaN",
    "inf",
    "nan",
    "Infinity",
    "0x10",
    "1:30.5",
    "٣",
    "٣.٥",
    "1e",
    "e3",
    "1.5.5",
]


@pytest.mark.parametrize(("text", "number"), NUMBERS)
def test_a_plain_decimal_is_the_same_number_in_yaml_csv_and_vary(text: str, number: float) -> None:
    assert read_everywhere("guidance_scale", text) == [repr(number)] * 3


@pytest.mark.parametrize("text", NOT_NUMBERS)
def test_any_other_spelling_is_the_text_written_in_yaml_csv_and_vary(text: str) -> None:
    assert read_everywhere("guidance_scale", text) == [repr(text)] * 3
    assert plain_number(text) is None


@pytest.mark.parametrize("text", ["1.5", "1e3", "٣", "1_0", "inf"])
def test_an_integer_field_reads_the_same_value_everywhere_too(text: str) -> None:
    assert len(set(read_everywhere("seed", text))) == 1


@pytest.mark.parametrize("text", ["!!float .inf", "!!float .nan", "!!float 1_0.5", "!!float 1:30"])
def test_an_explicit_float_tag_of_another_spelling_stays_text(text: str) -> None:
    assert yaml_value(text) == text.removeprefix("!!float ")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def located(issues: list[Issue]) -> list[tuple[str, int | None, int | None, str | None]]:
    return sorted((Path(i.file).name, i.line, i.item, i.field) for i in issues)


@pytest.mark.parametrize("text", ["1_0.5", ".inf", "-.inf", ".nan", "1e999"])
def test_a_number_field_refuses_them_at_their_line_in_yaml_and_csv(tmp_path: Path, text: str) -> None:
    write(tmp_path, "rows.csv", f"prompt,guidance_scale\nb,{text}\n")
    path = write(
        tmp_path,
        "m.yaml",
        HEAD + f"items_from: rows.csv\nitems:\n  - prompt: a\n    guidance_scale: {text}\n",
    )
    errors = validate_manifest(path).errors
    assert located(errors) == [("m.yaml", 6, 0, "guidance_scale"), ("rows.csv", 2, 1, "guidance_scale")]
    assert errors[0].message == errors[1].message


def test_no_infinity_or_nan_reaches_an_input(tmp_path: Path) -> None:
    """JSON's non-standard ``NaN``/``Infinity`` and a number beyond a float (``1e999``) are
    refused with their field; ``.inf`` in a text field is the text ".inf", as in a CSV cell."""
    write(
        tmp_path,
        "rows.jsonl",
        '{"prompt": "a", "guidance_scale": NaN}\n'
        '{"prompt": "b", "shift": -Infinity}\n'
        '{"prompt": "c", "guidance_scale": 1e999}\n',
    )
    path = write(tmp_path, "m.yaml", HEAD + "items_from: rows.jsonl\n")
    errors = validate_manifest(path).errors
    assert located(errors) == [
        ("rows.jsonl", 1, 0, "guidance_scale"),
        ("rows.jsonl", 2, 1, "shift"),
        ("rows.jsonl", 3, 2, "guidance_scale"),
    ]
    assert all("is not a finite number" in e.message for e in errors)
    assert "1e999" in errors[2].message  # says how an infinity came from a number written

    text = write(tmp_path, "t.yaml", HEAD + "items:\n  - prompt: .inf\n    negative_prompt: .nan\n")
    (job,) = load_manifest(text).jobs()
    assert job.input == {"prompt": ".inf", "negative_prompt": ".nan"}


@pytest.mark.parametrize("text", ["inf", "nan", "-inf", "1_0.5", "٣.٥", "infinity"])
def test_vary_refuses_what_a_manifest_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="expected a number, got text"):
        checked_values(SPEC, parse_vary(f"guidance_scale={text}"))


@pytest.mark.parametrize("text", ["seed=٣", "seed=٣..٥", "seed=1..٥", "seed=١٢"])
def test_vary_digits_are_ascii(text: str) -> None:
    with pytest.raises(UsageError) as refused:
        checked_values(SPEC, parse_vary(text))
    assert "expected an integer, got text" in str(refused.value)
    assert "ASCII digits 0-9" in str(refused.value)


def test_a_csv_seed_in_other_digits_is_refused_as_yaml_refuses_it(tmp_path: Path) -> None:
    write(tmp_path, "rows.csv", "prompt,seed,guidance_scale\nb,٣,1\nc,1,٣.٥\n")
    path = write(tmp_path, "m.yaml", HEAD + "items_from: rows.csv\nitems:\n  - prompt: a\n    seed: ٣\n")
    errors = validate_manifest(path).errors
    assert located(errors) == [
        ("m.yaml", 6, 0, "seed"),
        ("rows.csv", 2, 1, "seed"),
        ("rows.csv", 3, 2, "guidance_scale"),
    ]
    seed = next(e for e in errors if e.item == 1)
    assert str(seed).endswith(
        f"field 'seed': expected an integer, got text '٣' (allowed: {SEED_ALLOWED}, "
        "written with the ASCII digits 0-9)"
    )


@pytest.mark.parametrize("window", ["٢٢:00-06:00", "22:00-٠٦:00", "22:٠٠-06:00"])
def test_a_window_in_other_digits_is_refused(window: str) -> None:
    with pytest.raises(ValueError, match=r"is not two times HH:MM-HH:MM.*ASCII digits 0-9"):
        parse_window(window)


def test_a_manifest_window_in_other_digits_is_a_located_error(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", HEAD + 'items: [{prompt: a}]\nschedule:\n  window: "٢٢:00-06:00"\n')
    assert located(validate_manifest(path).errors) == [("m.yaml", 5, None, "schedule.window")]


LONG = "9" * 50 + "x" * 4950


@pytest.mark.parametrize(
    ("field", "phrase"),
    [
        ("seed", "expected an integer, got text"),
        ("guidance_scale", "expected a number, got text"),
        ("resolution", "is not one of the allowed values"),
    ],
)
def test_a_long_value_is_quoted_short(tmp_path: Path, field: str, phrase: str) -> None:
    write(tmp_path, "rows.csv", f"prompt,{field}\nb,{LONG}\n")
    path = write(
        tmp_path, "m.yaml", HEAD + f"items_from: rows.csv\nitems:\n  - prompt: a\n    {field}: {LONG}\n"
    )
    errors = validate_manifest(path).errors
    assert len(errors) == 2
    for error in errors:
        assert phrase in error.message
        assert "… (5,000 characters)" in error.message
        assert len(error.message) < 160


def test_a_long_list_is_quoted_short(tmp_path: Path) -> None:
    path = write(tmp_path, "m.yaml", HEAD + f"items:\n  - prompt: a\n    seed: [{', '.join(['1'] * 3000)}]\n")
    (error,) = validate_manifest(path).errors
    assert "… (3,000 items); a list makes one job per value only under `matrix:`" in error.message
    assert len(error.message) < 200


def test_a_long_vary_value_is_quoted_short() -> None:
    with pytest.raises(UsageError) as refused:
        checked_values(SPEC, parse_vary(f"seed={LONG}"))
    assert len(str(refused.value)) < 300
    assert str(refused.value).startswith("--vary seed=999")


def test_a_vary_range_of_too_many_digits_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="more than 100 digits") as refused:
        parse_vary(f"seed=1..{'9' * 5000}")
    assert len(str(refused.value)) < 200


def test_the_cli_says_one_short_line_for_such_a_range(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """It was "internal error: ValueError: Exceeds the limit (4300 digits) …", exit 70."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'wb.db'}")
    monkeypatch.setattr(startup, "pause", lambda: None)
    monkeypatch.setattr(sys, "argv", ["wanbatch", "rerun", "nosuch", "--vary", f"seed=1..{'9' * 5000}"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "a whole number of more than 100 digits is refused" in err
    assert len(err) < 200


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("abc", "'abc'"),
        ("a" * 60, repr("a" * 60)),
        ("a" * 61, f"{'a' * 60!r}… (61 characters)"),
        ([1, 2], "[1, 2]"),
        (list(range(100)), f"{repr(list(range(100)))[:60]}… (100 items)"),
        (1.5, "1.5"),
    ],
)
def test_quoted(value: object, shown: str) -> None:
    assert quoted(value) == shown


def test_shortened() -> None:
    assert shortened("abc") == "abc"
    assert shortened("x" * 5000, 10) == "xxxxxxxxxx… (5,000 characters)"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[("true", True), ("Yes", True), ("ON", True), ("y", True), ("1", True)],
        *[("false", False), ("no", False), ("Off", False), ("N", False), ("0", False)],
    ],
)
def test_a_boolean_word_is_the_same_value_in_a_csv_cell_and_vary(text: str, value: bool) -> None:
    """``--vary enable_safety_checker=yes`` was refused ("expected a boolean, got str") while the
    same word in an ``items_from`` CSV cell was ``True``: one rule now reads both."""
    fld = SPEC.field("enable_safety_checker")
    assert fld is not None
    assert csv_value(SPEC, "enable_safety_checker", text) is value
    assert typed(fld, text) is value
    assert checked_values(SPEC, parse_vary(f"enable_safety_checker={text}")) == [value]


def test_a_word_that_is_no_boolean_stays_text_in_a_csv_cell_and_vary() -> None:
    fld = SPEC.field("enable_safety_checker")
    assert fld is not None
    assert csv_value(SPEC, "enable_safety_checker", "maybe") == "maybe"
    assert typed(fld, "maybe") == "maybe"
    with pytest.raises(UsageError, match="expected true or false"):
        checked_values(SPEC, parse_vary("enable_safety_checker=maybe"))
