"""An ``items_from`` CSV header is checked once: a misspelt column is one error at line 1.

It was two errors of ~300 characters on every row (the unknown column, and the required field
it was meant to be), none naming the header where the one mistake is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.manifest import validate_manifest
from tests.in_process import run_main

MANIFEST = "name: x\nendpoint: fal-ai/wan-i2v\nitems_from: rows.csv\n"


def _rows(folder: Path, header: str, count: int, bad_seed_at: int | None = None) -> None:
    lines = [header]
    for i in range(count):
        lines.append(f"p{i},https://example.com/a.png,{'abc' if i == bad_seed_at else i}")
    (folder / "rows.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_a_misspelt_column_is_said_once_at_the_header(tmp_path: Path) -> None:
    _rows(tmp_path, "promt,image_url,seed", 5, bad_seed_at=2)
    (tmp_path / "m.yaml").write_text(MANIFEST, encoding="utf-8")
    report = validate_manifest(tmp_path / "m.yaml")
    assert not report.ok
    shown = [str(e) for e in report.errors]
    assert len(shown) == 3, shown
    unknown, required, seed = report.errors
    assert unknown.file.endswith("rows.csv")
    assert (unknown.line, unknown.item, unknown.field) == (1, None, "promt")
    assert "unknown column 'promt'" in unknown.message
    assert "(did you mean 'prompt'?)" in unknown.message
    assert unknown.allowed is not None
    assert "prompt, negative_prompt, image_url" in unknown.allowed
    assert (required.line, required.item, required.field) == (1, None, "prompt")
    assert required.message == "column 'prompt' is required and missing from the header"
    assert (seed.line, seed.item, seed.field) == (4, 2, "seed")  # the rows' own errors still show


def test_endpoint_is_a_column_a_csv_may_carry(tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text(
        "endpoint,prompt,image_url,promt\n,a,https://example.com/a.png,x\nfal-ai/wan-22,b,,y\n",
        encoding="utf-8",
    )
    (tmp_path / "m.yaml").write_text(MANIFEST, encoding="utf-8")
    errors = validate_manifest(tmp_path / "m.yaml").errors
    assert [(e.line, e.field) for e in errors] == [(1, "promt")], [str(e) for e in errors]
    assert "for any endpoint" in errors[0].message


def test_a_required_field_given_by_defaults_is_no_header_error(tmp_path: Path) -> None:
    _rows(tmp_path, "negative_prompt,image_url,sed", 3)
    (tmp_path / "m.yaml").write_text(MANIFEST + "defaults: {prompt: hi}\n", encoding="utf-8")
    errors = validate_manifest(tmp_path / "m.yaml").errors
    assert [(e.line, e.field) for e in errors] == [(1, "sed")], [str(e) for e in errors]


def test_validate_says_a_misspelt_header_in_a_few_lines_not_two_per_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _rows(tmp_path, "promt,image_url,seed", 1000)
    (tmp_path / "m.yaml").write_text(MANIFEST, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert run_main(["validate", "m.yaml"], monkeypatch) == 2
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) <= 4, lines[:6]
    assert any(line.startswith("error rows.csv:1: field 'promt'") for line in lines), lines
    assert run_main(["validate", "m.yaml", "--json"], monkeypatch) == 2
    report = json.loads(capsys.readouterr().out)
    assert len(json.dumps(report)) < 5_000
