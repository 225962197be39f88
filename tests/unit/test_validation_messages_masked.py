"""Validation messages quote what the manifest says, but never a URL's credentials, and never a
matrix value at full length (found by a hostile-input audit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.in_process import run_main

SECRET = "sk-AUDIT-SECRET-1234"


@pytest.fixture(autouse=True)
def _scratch_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'w.db'}")


def test_a_url_password_in_a_refused_value_is_masked_in_text_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "name: t\nendpoint: fal-ai/wan-i2v\nitems:\n  - prompt: hi\n"
        f'    image_url: "ftp://u:{SECRET}@example.com/a.png"\n'
        f'    resolution: "http://u:{SECRET}@example.com/"\n'
    )
    assert run_main(["validate", str(manifest)], monkeypatch) == 2
    text = capsys.readouterr()
    assert SECRET not in text.out + text.err
    assert "'http://u:**@example.com/' is not one of the allowed values" in text.out + text.err
    assert run_main(["validate", "--json", str(manifest)], monkeypatch) == 2
    out = capsys.readouterr().out
    assert SECRET not in out
    values = [issue["value"] for issue in json.loads(out)["issues"]]
    assert "ftp://u:**@example.com/a.png" in values


def test_the_identical_job_warning_masks_and_shortens_matrix_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    long = "x" * 100_000
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "name: t\nendpoint: fal-ai/wan-i2v\nitems:\n  - prompt: a\nmatrix:\n"
        f'  image_url: ["https://u:{SECRET}@example.com/a.png", "https://u:{SECRET}@example.com/a.png"]\n'
        f"  prompt: [{long}, {long}]\n"
    )
    assert run_main(["validate", str(manifest)], monkeypatch) == 0
    printed = capsys.readouterr()
    lines = (printed.out + printed.err).splitlines()
    warnings = [line for line in lines if "identical to the job of" in line]
    assert warnings
    assert all(SECRET not in line and "u:**@example.com" in line for line in warnings)
    assert max(len(line) for line in warnings) < 1_000


def test_a_matrix_entry_of_lists_is_told_its_entries_list_single_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "name: t\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: hi\nmatrix:\n  seed: [[1, 2], [3]]\n"
    )
    assert run_main(["validate", str(manifest)], monkeypatch) == 2
    printed = capsys.readouterr()
    assert "whose entries list single values" in printed.out + printed.err
