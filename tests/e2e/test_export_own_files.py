"""``export -o`` never replaces one of wanbatch's own files.

Audit: the export renamed its file over any ``-o``: ``-o wanbatch.db`` (the live SQLite database)
exited 0 and every later command failed "file is not a database"; ``-o`` a stored video under
``WANBATCH_OUTPUT_DIR`` became JSON Lines (a later ``hf`` export failed); ``-o`` the manifest's
``items_from`` file lost its rows. Each is now refused (exit 2, one ``error: PATH: …`` line, the
file untouched); an export beside them still works.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.e2e_helpers import MakeManifest
from tests.in_process import run_main

MANIFEST = """\
name: guarded
endpoint: fal-ai/wan-i2v
defaults: {resolution: 480p}
items:
  - {prompt: a lighthouse at dusk, image_url: images/landscape.jpg, seed: 3}
items_from: rows.jsonl
"""


@pytest.fixture
def batch(manifest: MakeManifest, e2e_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A simulated batch of two jobs (one from ``rows.jsonl``), run to the end; its manifest."""
    row = '{"prompt": "a fox in the snow", "image_url": "images/night.jpg", "seed": 2}\n'
    (e2e_env / "rows.jsonl").write_text(row, encoding="utf-8")
    path = manifest("guarded", MANIFEST)
    assert run_main(["run", str(path), "--simulate", "--no-progress"], monkeypatch) == 0
    return path


def _refused(
    target: Path, fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    capsys.readouterr()
    before = target.read_bytes()
    assert run_main(["export", "guarded", "--format", fmt, "-o", str(target)], monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert target.read_bytes() == before  # untouched
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".part")]
    assert len(err.splitlines()) == 1, err
    # a long path is shown shortened in the middle (`output…uarded`): its name is what must be there
    assert err.startswith("error: "), err
    assert f"{target.name}: this is " in err, err
    assert err.endswith("choose another path for the export")
    return err


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_the_database_file_is_refused(
    batch: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _refused(tmp_path / "wanbatch.db", fmt, monkeypatch, capsys)
    assert "wanbatch's database" in err
    assert run_main(["status", "guarded"], monkeypatch) == 0  # the database still works


def test_a_stored_video_is_refused(
    batch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    video = next((tmp_path / "outputs").rglob("*.mp4"))
    err = _refused(video, "jsonl", monkeypatch, capsys)
    assert "inside WANBATCH_OUTPUT_DIR" in err
    assert run_main(["export", "guarded", "--format", "hf", "-o", str(video.parent / "ds")], monkeypatch) == 2
    assert not (video.parent / "ds").exists()


def test_the_items_from_file_and_the_manifest_are_refused(
    batch: Path, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _refused(e2e_env / "rows.jsonl", "csv", monkeypatch, capsys)
    assert "the items_from file of batch guarded" in rows
    assert "the manifest of batch guarded" in _refused(batch, "jsonl", monkeypatch, capsys)
    image = batch.parent / "images" / "landscape.jpg"
    assert "a source file (image_url)" in _refused(image, "jsonl", monkeypatch, capsys)


def test_an_export_beside_them_works(
    batch: Path, tmp_path: Path, e2e_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    beside_db = tmp_path / "wanbatch.jsonl"
    assert run_main(["export", "guarded", "--format", "jsonl", "-o", str(beside_db)], monkeypatch) == 0
    assert len(beside_db.read_text().splitlines()) == 2
    beside_outputs = tmp_path / "outputs.csv"
    assert run_main(["export", "guarded", "--format", "csv", "-o", str(beside_outputs)], monkeypatch) == 0
    beside_rows = e2e_env / "rows.export.jsonl"
    assert run_main(["export", "guarded", "--format", "jsonl", "-o", str(beside_rows)], monkeypatch) == 0
    assert [json.loads(line)["status"] for line in beside_rows.read_text().splitlines()] == ["succeeded"] * 2
    hf = tmp_path / "hf"
    assert run_main(["export", "guarded", "--format", "hf", "-o", str(hf)], monkeypatch) == 0
    assert (hf / "metadata.jsonl").is_file()
