"""A moved project's stored videos (audit r3): the project folder (manifest, images, its
``wanbatch.db`` and ``./outputs``) moved or copied elsewhere kept its manifest and images
(``manifest_moved``) but not its videos: ``jobs.output_path`` is absolute, so with the old folder
gone ``export --format hf`` failed ("job … succeeded but its video is missing (/old/…)"), a
JSON Lines export gave dead paths and a ``reuse_outputs`` twin was paid for again; with the old
folder still there (a copy) the copy's hf export hard-linked the original's files. The same
``<batch folder>/<file>`` under the current ``WANBATCH_OUTPUT_DIR``, holding the recorded
SHA-256, is now the video (``jobs.moved_outputs``), and its path is recorded.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from jobs.db import close_engines
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import EXAMPLES, db_rows
from tests.in_process import run_main

MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-22
{extra}defaults:
  resolution: 480p
items:
  - prompt: A paper boat drifting down a rainy street
    seed: 7
  - prompt: A fox running through snow
    seed: 8
  - endpoint: fal-ai/wan-i2v
    prompt: Clouds drifting past a mountain
    image_url: images/landscape.jpg
    seed: 42
"""


def _enter(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Work in ``folder`` as a user of the defaults does: ``./wanbatch.db``, ``./outputs``."""
    monkeypatch.chdir(folder)
    monkeypatch.setenv("WANBATCH_DATABASE_URL", "sqlite:///wanbatch.db")
    monkeypatch.delenv("WANBATCH_OUTPUT_DIR", raising=False)
    get_settings.cache_clear()
    close_engines()


def _ran_project(work: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``work/orig``: a project run to the end from its folder; the folder."""
    folder = work / "orig"
    (folder / "images").mkdir(parents=True)
    shutil.copy(EXAMPLES / "images" / "landscape.jpg", folder / "images")
    (folder / "m.yaml").write_text(MANIFEST.format(name=name, extra=""), encoding="utf-8")
    _enter(folder, monkeypatch)
    assert run_main(["run", "m.yaml", "--no-progress"], monkeypatch) == 0
    return folder


def _output_paths(folder: Path) -> list[str]:
    rows = db_rows(f"sqlite:///{folder / 'wanbatch.db'}", "SELECT output_path FROM jobs ORDER BY item_index")
    return [row[0] for row in rows]


def _moved(work: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A project run in ``work/orig`` and moved to ``work/elsewhere/moved`` (the old folder
    gone), worked in from there: ``(old, new)``."""
    old = _ran_project(work, name, monkeypatch)
    new = work / "elsewhere" / "moved"
    new.parent.mkdir()
    old.rename(new)
    _enter(new, monkeypatch)
    return old, new


def test_a_moved_projects_exports_find_its_videos_in_its_new_folder(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _moved(e2e_env, "mvo1", monkeypatch)
    assert all(path.startswith(f"{old}/outputs/mvo1/") for path in _output_paths(new))
    capsys.readouterr()

    assert run_main(["export", "mvo1", "--format", "jsonl"], monkeypatch) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["video_path"].split("/")[0] for row in rows] == ["mvo1"] * 3  # relative: inside ./outputs
    for row in rows:
        assert (new / "outputs" / row["video_path"]).is_file()
    # Found once, recorded: the database names the new folder now.
    assert all(path.startswith(f"{new}/outputs/mvo1/") for path in _output_paths(new))

    assert run_main(["export", "mvo1", "--format", "csv"], monkeypatch) == 0
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["video_path"] for r in records] == [row["video_path"] for row in rows]

    assert run_main(["export", "mvo1", "--format", "hf", "-o", "ds"], monkeypatch) == 0
    assert "3 video(s) (3 hard-linked, 0 copied)" in capsys.readouterr().err
    for video in (new / "ds" / "videos").iterdir():
        assert video.stat().st_ino == (new / "outputs" / "mvo1" / video.name).stat().st_ino


def test_the_hf_export_of_a_moved_project_with_its_paths_unrecorded_still_finds_them(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first command after the move is the hf export (nothing recorded the new paths yet)."""
    _old, new = _moved(e2e_env, "mvo2", monkeypatch)
    capsys.readouterr()
    code = run_main(["export", "mvo2", "--format", "hf", "-o", "ds"], monkeypatch)
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in (new / "ds" / "videos").iterdir())
    assert names == sorted(p.name for p in (new / "outputs" / "mvo2").glob("*.mp4"))


def test_a_video_with_other_bytes_in_the_new_folder_is_not_taken(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _moved(e2e_env, "mvo3", monkeypatch)
    video = sorted((new / "outputs" / "mvo3").glob("*.mp4"))[0]
    data = bytearray(video.read_bytes())
    data[-1] ^= 0xFF  # the same size, other bytes
    video.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_main(["export", "mvo3", "--format", "hf", "-o", "ds"], monkeypatch) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "(1 missing; first: job " in err, err
    assert f", {old}/outputs/mvo3/{video.name})" in err, err
    assert not (new / "ds").exists()
    assert _output_paths(new)[0] == f"{old}/outputs/mvo3/{video.name}"


def test_submitting_a_moved_project_records_where_its_videos_are(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _old, new = _moved(e2e_env, "mvo4", monkeypatch)
    gone = sorted((new / "outputs" / "mvo4").glob("*.mp4"))[-1]
    gone.unlink()  # one video lost in the move: found nowhere, said so
    capsys.readouterr()

    assert run_main(["submit", "m.yaml", "--json"], monkeypatch) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["manifest_moved"]["to"] == str(new / "m.yaml")
    assert result["outputs_followed"] == 2
    assert any(
        "1 stored video(s) of batch mvo4 or its reruns are neither where they were stored" in w
        for w in result["warnings"]
    ), result["warnings"]
    paths = _output_paths(new)
    assert [p.startswith(f"{new}/outputs/mvo4/") for p in paths] == [True, True, False]

    # Without --json: the moved line says it. Nothing moved this time: nothing said.
    assert run_main(["submit", "m.yaml"], monkeypatch) == 0
    assert "found in its new output folder" not in capsys.readouterr().err


def test_a_reuse_outputs_twin_of_a_moved_projects_video_is_not_paid_again(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _old, new = _moved(e2e_env, "mvo5", monkeypatch)
    accepted = sim.ledger()["accepted"]
    (new / "m2.yaml").write_text(
        "name: mvo5b\nendpoint: fal-ai/wan-22\nreuse_outputs: true\ndefaults:\n  resolution: 480p\n"
        "items:\n  - prompt: A paper boat drifting down a rainy street\n    seed: 7\n",
        encoding="utf-8",
    )
    assert run_main(["run", "m2.yaml", "--no-progress"], monkeypatch) == 0
    assert sim.ledger()["accepted"] == accepted  # reused, not sent
    [twin] = db_rows(
        f"sqlite:///{new / 'wanbatch.db'}",
        "SELECT j.output_path, j.reused_from FROM jobs j JOIN batches b ON b.id = j.batch_id "
        "WHERE b.name = 'mvo5b'",
    )
    assert twin[0].startswith(f"{new}/outputs/mvo5/")
    assert twin[1] is not None
    assert _output_paths(new)[0] == twin[0]  # the source's new place, recorded


def test_a_copy_beside_the_original_exports_its_own_videos(
    sim: SimulatorHandle, e2e_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _ran_project(e2e_env, "mvo6", monkeypatch)
    copy = e2e_env / "copy"
    shutil.copytree(old, copy)
    _enter(copy, monkeypatch)
    capsys.readouterr()

    assert run_main(["export", "mvo6", "--format", "hf", "-o", "ds"], monkeypatch) == 0
    for video in (copy / "ds" / "videos").iterdir():
        assert video.stat().st_ino == (copy / "outputs" / "mvo6" / video.name).stat().st_ino
        assert video.stat().st_ino != (old / "outputs" / "mvo6" / video.name).stat().st_ino
    assert all(p.startswith(f"{copy}/outputs/") for p in _output_paths(copy))
    assert all(p.startswith(f"{old}/outputs/") for p in _output_paths(old))  # the original's own


def test_a_copys_twin_with_other_bytes_falls_back_to_the_intact_original(
    sim: SimulatorHandle,
    e2e_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: in a copied project, a file under the copy's output folder of the recorded size but
    other bytes made ``reuse_outputs`` pass the twin over without trying the intact original at
    the recorded path, and the job was sent (and paid) again. Now the recorded path is tried
    next; its SHA-256 is checked as the copy's was, and bytes of another SHA-256 are never taken."""
    old = _ran_project(e2e_env, "mvo7", monkeypatch)
    copy = e2e_env / "copy"
    shutil.copytree(old, copy)
    original = Path(_output_paths(copy)[0])  # item 0 (seed 7), as recorded: the original's file
    assert original.is_relative_to(old)
    edited = copy / "outputs" / "mvo7" / original.name
    data = bytearray(edited.read_bytes())
    data[-1] ^= 0xFF  # the same size, other bytes
    edited.write_bytes(bytes(data))
    _enter(copy, monkeypatch)
    accepted = sim.ledger()["accepted"]
    (copy / "m2.yaml").write_text(
        "name: mvo7b\nendpoint: fal-ai/wan-22\nreuse_outputs: true\ndefaults:\n  resolution: 480p\n"
        "items:\n  - prompt: A paper boat drifting down a rainy street\n    seed: 7\n",
        encoding="utf-8",
    )
    capsys.readouterr()
    assert run_main(["run", "m2.yaml", "--no-progress"], monkeypatch) == 0
    err = capsys.readouterr().err
    assert sim.ledger()["accepted"] == accepted, err  # reused, not sent (before: sent, paid again)
    [twin] = db_rows(
        f"sqlite:///{copy / 'wanbatch.db'}",
        "SELECT j.output_path, j.reused_from, j.output_sha256 FROM jobs j "
        "JOIN batches b ON b.id = j.batch_id WHERE b.name = 'mvo7b'",
    )
    assert twin[0] == str(original)  # the intact original, never the edited copy
    assert twin[1] is not None
    [source] = db_rows(
        f"sqlite:///{copy / 'wanbatch.db'}", f"SELECT output_sha256 FROM jobs WHERE id = '{twin[1]}'"
    )
    assert twin[2] == source[0]
    assert _output_paths(copy)[0] == str(original)  # not re-pointed at the edited file
    assert f"{edited} is not the output job" in caplog.text, caplog.text  # said, not taken
