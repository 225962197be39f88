"""A project folder (manifest and images) moved, and its manifest submitted again from there.

Audit: the batch, found by its ``name:``, kept the old folder (``manifest_path``), and its jobs,
found by their keys (which stand for the files by their bytes), kept the old absolute paths:
``run proj2/m.yaml`` failed the unsent job ("media file 'images/landscape.jpg' does not exist",
named relative to the old folder, so it named a file the user could see), and ``rerun`` refused
("images/landscape.jpg: missing"). Submitted from its new place, the batch takes it: its
manifest path, and every stored job's media paths; what a job sent stays what it sent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import EXAMPLES, db_rows
from tests.in_process import run_main

MANIFEST = """\
name: {name}
endpoint: fal-ai/wan-i2v
defaults: {{resolution: 480p}}
items:
{items}"""
ONE = "  - {prompt: moved before run, image_url: images/landscape.jpg, seed: 4}\n"
TWO = ONE + "  - {prompt: a second one, image_url: images/night.jpg, seed: 5}\n"


def _project(work: Path, name: str, items: str = ONE) -> Path:
    """``work/proj``: a manifest beside a copy of the example images; its path."""
    folder = work / "proj"
    shutil.copytree(EXAMPLES / "images", folder / "images")
    path = folder / "m.yaml"
    path.write_text(MANIFEST.format(name=name, items=items), encoding="utf-8")
    return path


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'wanbatch.db'}"


def _jobs(tmp_path: Path, batch: str) -> list[tuple[str, dict[str, Any], str | None]]:
    """The batch's jobs in item order: state, input, submitted input (its JSON text)."""
    rows = db_rows(
        _url(tmp_path),
        "SELECT j.state, j.input, j.submitted_input FROM jobs j JOIN batches b ON b.id = j.batch_id "
        f"WHERE b.name = '{batch}' ORDER BY j.item_index",
    )
    return [(state, json.loads(given), sent) for state, given, sent in rows]


def _manifest_path(tmp_path: Path, batch: str) -> str:
    return str(db_rows(_url(tmp_path), f"SELECT manifest_path FROM batches WHERE name = '{batch}'")[0][0])


def _moved_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " moved: its manifest is now " in line]


def test_a_moved_project_sends_its_unsent_jobs_from_the_new_folder(
    sim: SimulatorHandle,
    e2e_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The audit's repro: submitted, moved before it ran, then run from the new folder."""
    _project(e2e_env, "mv4")
    assert run_main(["submit", "proj/m.yaml"], monkeypatch) == 0
    capsys.readouterr()
    (e2e_env / "proj").rename(e2e_env / "proj2")

    assert run_main(["run", "proj2/m.yaml", "--no-progress"], monkeypatch) == 0
    err = capsys.readouterr().err
    assert _moved_lines(err) == [
        f"batch mv4 moved: its manifest is now proj2/m.yaml (was {e2e_env / 'proj' / 'm.yaml'})"
    ], err
    assert "does not exist" not in err
    assert _manifest_path(tmp_path, "mv4") == str(e2e_env / "proj2" / "m.yaml")
    [(state, given, sent)] = _jobs(tmp_path, "mv4")
    assert state == "succeeded"
    assert given["image_url"] == str(e2e_env / "proj2" / "images" / "landscape.jpg")
    assert sent is not None
    assert json.loads(sent)["image_url"].startswith("data:image/jpeg;base64,")
    assert sim.ledger()["accepted"] == 1

    # Submitted again from there: nothing moved, nothing said.
    assert run_main(["submit", "proj2/m.yaml"], monkeypatch) == 0
    assert _moved_lines(capsys.readouterr().err) == []

    # The rerun finds its files in the new folder, and is stored as from there.
    assert run_main(["rerun", "mv4", "--no-progress"], monkeypatch) == 0
    assert _moved_lines(capsys.readouterr().err) == []
    assert _manifest_path(tmp_path, "mv4-rerun-1") == str(e2e_env / "proj2" / "m.yaml")
    [(state, given, _)] = _jobs(tmp_path, "mv4-rerun-1")
    assert (state, given["image_url"]) == ("succeeded", str(e2e_env / "proj2" / "images" / "landscape.jpg"))


def test_rerun_after_a_move_finds_the_files_once_the_manifest_was_run_from_there(
    e2e_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run (a simulation) before the move: every job is done, and the rerun reads the stored
    paths. Refused before the batch knows the new place, with the file's absolute path (its
    old folder is gone: ``images/landscape.jpg`` would name the file in the new one)."""
    _project(e2e_env, "mv2")
    assert run_main(["run", "proj/m.yaml", "--simulate", "--no-progress"], monkeypatch) == 0
    (e2e_env / "proj").rename(e2e_env / "proj2")
    capsys.readouterr()

    assert run_main(["rerun", "mv2", "--simulate", "--no-progress"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"  {e2e_env / 'proj' / 'images' / 'landscape.jpg'}: missing" in err, err
    assert "give the batch its new place first (`wanbatch run NEW-FOLDER/m.yaml --simulate`)" in err

    assert run_main(["run", "proj2/m.yaml", "--simulate", "--no-progress"], monkeypatch) == 0
    assert _moved_lines(capsys.readouterr().err) == [
        f"batch mv2 moved: its manifest is now proj2/m.yaml (was {e2e_env / 'proj' / 'm.yaml'})"
    ]
    rerun = run_main(["rerun", "mv2", "--simulate", "--no-progress"], monkeypatch)
    assert rerun == 0, capsys.readouterr().err
    [(state, given, _)] = _jobs(tmp_path, "mv2-rerun-1")
    assert (state, given["image_url"]) == ("succeeded", str(e2e_env / "proj2" / "images" / "landscape.jpg"))


def test_the_manifest_submitted_now_defines_the_paths(
    sim: SimulatorHandle,
    e2e_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A copy, not a move: the old images are still there, and the copy's win. While the old
    manifest is still in its place, a copy that leaves one of its jobs out is refused (it could be
    another project with the same name); once that manifest is gone, the batch moves. A job the
    copy no longer has keeps its paths (they are outside the new folder); never sent, it is
    dropped (cancelled) by the submit that left it out, so its file, gone since, is never read."""
    original = _project(e2e_env, "cp1", TWO)
    assert run_main(["submit", "proj/m.yaml"], monkeypatch) == 0
    shutil.copytree(e2e_env / "proj", e2e_env / "copy")
    (e2e_env / "copy" / "m.yaml").write_text(MANIFEST.format(name="cp1", items=ONE), encoding="utf-8")
    capsys.readouterr()

    assert run_main(["submit", "copy/m.yaml"], monkeypatch) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: batch cp1 belongs to {original}, which is still there, and copy/m.yaml leaves out 1 of its "
        f"2 job(s): give this manifest another `name:` (or, if it is the same project moved, move or "
        f"delete {original} first, or run the command again with `--take-over`)"
    ]
    original.unlink()  # the project moved on purpose: its images stay where they were
    assert run_main(["submit", "copy/m.yaml"], monkeypatch) == 0
    assert _moved_lines(capsys.readouterr().err) == [
        f"batch cp1 moved: its manifest is now copy/m.yaml (was {e2e_env / 'proj' / 'm.yaml'})"
    ]
    first, second = _jobs(tmp_path, "cp1")
    assert first[1]["image_url"] == str(e2e_env / "copy" / "images" / "landscape.jpg")
    assert second[1]["image_url"] == str(e2e_env / "proj" / "images" / "night.jpg")  # not in the copy

    gone = e2e_env / "proj" / "images" / "night.jpg"
    gone.unlink()  # still in copy/images: the dropped job never reads either
    assert run_main(["run", "copy/m.yaml", "--no-progress"], monkeypatch) == 0  # the copy's job succeeded
    capsys.readouterr()
    errors = db_rows(_url(tmp_path), "SELECT state, error_type, attempts FROM jobs ORDER BY item_index")
    assert [tuple(row) for row in errors] == [("succeeded", None, 1), ("cancelled", "not_in_manifest", 0)]


def _rerun_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "reruns" in line and " moved" in line]


def test_the_reruns_of_a_moved_batch_move_with_it(
    e2e_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Audit: submitting the manifest from its new folder moved only its batch. Its reruns kept
    the old folder and their jobs the old absolute paths, so ``rerun mv5-rerun-1`` (and every
    later generation) was refused for good ("…/proj/images/landscape.jpg: missing"), with no
    hint: they have no manifest to submit. Now they follow the batch, and the refusal before
    that names the manifest whose submit brings them along. Their files stay checked by their
    SHA-256: a changed one is refused as before."""
    _project(e2e_env, "mv5")
    assert run_main(["run", "proj/m.yaml", "--simulate", "--no-progress"], monkeypatch) == 0
    assert run_main(["rerun", "mv5", "--simulate", "--no-progress"], monkeypatch) == 0
    assert run_main(["rerun", "mv5-rerun-1", "--simulate", "--no-progress"], monkeypatch) == 0
    (e2e_env / "proj").rename(e2e_env / "proj2")
    capsys.readouterr()

    assert run_main(["rerun", "mv5-rerun-1", "--simulate", "--no-progress"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"  {e2e_env / 'proj' / 'images' / 'landscape.jpg'}: missing" in err, err
    assert (
        "give batch mv5, which mv5-rerun-1 is a rerun of, its new place first "
        "(`wanbatch run NEW-FOLDER/m.yaml --simulate`): its reruns move with it" in err
    ), err

    assert run_main(["run", "proj2/m.yaml", "--simulate", "--no-progress"], monkeypatch) == 0
    assert _moved_lines(capsys.readouterr().err) == [
        f"batch mv5 moved: its manifest is now proj2/m.yaml (was {e2e_env / 'proj' / 'm.yaml'}); "
        "its reruns moved with it: mv5-rerun-1, mv5-rerun-1-rerun-1"
    ]
    moved = str(e2e_env / "proj2" / "images" / "landscape.jpg")
    for name in ("mv5-rerun-1", "mv5-rerun-1-rerun-1"):
        assert _manifest_path(tmp_path, name) == str(e2e_env / "proj2" / "m.yaml")
        [(_, given, _)] = _jobs(tmp_path, name)
        assert given["image_url"] == moved

    for ref in ("mv5-rerun-1", "mv5-rerun-1-rerun-1"):
        rerun = run_main(["rerun", ref, "--simulate", "--no-progress"], monkeypatch)
        assert rerun == 0, capsys.readouterr().err
    [(state, given, _)] = _jobs(tmp_path, "mv5-rerun-1-rerun-2")
    assert (state, given["image_url"]) == ("succeeded", moved)
    capsys.readouterr()

    # Followed, not trusted: a different image at the new path is refused, with both hashes.
    image = e2e_env / "proj2" / "images" / "landscape.jpg"
    image.write_bytes(image.read_bytes() + b"\0")
    assert run_main(["rerun", "mv5-rerun-1", "--simulate", "--no-progress"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "  images/landscape.jpg: changed since the batch was submitted (SHA-256 " in err, err
    assert "new place" not in err


def test_reruns_an_older_version_left_behind_catch_up_on_the_next_submit(
    e2e_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch moved by a version that moved only the batch has its reruns in the old folder,
    and submitting from the new one moves nothing any more: the refusal names that manifest,
    and submitting it (again) brings the reruns there."""
    _project(e2e_env, "mv6")
    assert run_main(["run", "proj/m.yaml", "--simulate", "--no-progress"], monkeypatch) == 0
    assert run_main(["rerun", "mv6", "--simulate", "--no-progress"], monkeypatch) == 0
    old_manifest, old_image = e2e_env / "proj" / "m.yaml", e2e_env / "proj" / "images" / "landscape.jpg"
    (e2e_env / "proj").rename(e2e_env / "proj2")
    assert run_main(["run", "proj2/m.yaml", "--simulate", "--no-progress"], monkeypatch) == 0
    # What the older version left: the rerun where the batch was.
    engine = create_engine(_url(tmp_path))
    try:
        with engine.begin() as conn:
            rerun_id = conn.execute(text("SELECT id FROM batches WHERE name = 'mv6-rerun-1'")).scalar_one()
            conn.execute(
                text("UPDATE batches SET manifest_path = :p WHERE id = :b"),
                {"p": str(old_manifest), "b": rerun_id},
            )
            conn.execute(
                text("UPDATE jobs SET input = :i WHERE batch_id = :b"),
                {
                    "i": json.dumps({**_jobs(tmp_path, "mv6-rerun-1")[0][1], "image_url": str(old_image)}),
                    "b": rerun_id,
                },
            )
    finally:
        engine.dispose()
    capsys.readouterr()

    assert run_main(["rerun", "mv6-rerun-1", "--simulate", "--no-progress"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert f"  {old_image}: missing" in err, err
    assert f"(`wanbatch run {e2e_env / 'proj2' / 'm.yaml'} --simulate`): its reruns move with it" in err, err

    assert run_main(["run", "proj2/m.yaml", "--simulate", "--no-progress"], monkeypatch) == 0
    err = capsys.readouterr().err
    assert _moved_lines(err) == []
    assert _rerun_lines(err) == ["reruns of batch mv6 moved to its place (proj2/m.yaml): mv6-rerun-1"], err
    assert run_main(["rerun", "mv6-rerun-1", "--simulate", "--no-progress"], monkeypatch) == 0


def test_another_project_with_the_same_name_is_refused_not_merged(
    sim: SimulatorHandle,
    e2e_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Audit (reproducibility sweeps): two projects on one database with the same ``name:``. The
    second was merged into the first's batch, announced as a "move", every job of the first was
    dropped and its budget cap replaced. While the first manifest is still there and the second
    asks for none of its jobs, it is refused in one line and nothing changes; once the first
    manifest is moved away, the submit is a move as before."""
    first = _project(e2e_env, "same", TWO)
    first.write_text(first.read_text(encoding="utf-8") + "budget: {max_usd: 5}\n", encoding="utf-8")
    assert run_main(["submit", "proj/m.yaml"], monkeypatch) == 0
    other = e2e_env / "other"
    shutil.copytree(EXAMPLES / "images", other / "images")
    lone = "  - {prompt: an unrelated project, image_url: images/night.jpg, seed: 99}\n"
    (other / "m.yaml").write_text(MANIFEST.format(name="same", items=lone), encoding="utf-8")
    capsys.readouterr()

    assert run_main(["submit", "other/m.yaml"], monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: batch same belongs to {first}, which is still there, and other/m.yaml asks for none of "
        f"its jobs: give this manifest another `name:` (or, if it is the same project moved, move or "
        f"delete {first} first, or run the command again with `--take-over`)"
    ]
    assert _manifest_path(tmp_path, "same") == str(first)
    assert [state for state, _, _ in _jobs(tmp_path, "same")] == ["pending", "pending"]
    budget = db_rows(_url(tmp_path), "SELECT budget_max_usd FROM batches WHERE name = 'same'")[0][0]
    assert int(budget) == 5_000_000_000  # $5.00, stored in nano-dollars: the cap is unchanged

    # Sharing one item with it changes nothing: the first project's other job would be dropped.
    shared = lone + "  - {prompt: moved before run, image_url: images/landscape.jpg, seed: 4}\n"
    (other / "m.yaml").write_text(MANIFEST.format(name="same", items=shared), encoding="utf-8")
    assert run_main(["submit", "other/m.yaml"], monkeypatch) == 2
    assert "other/m.yaml leaves out 1 of its 2 job(s): give this manifest another" in capsys.readouterr().err
    assert [state for state, _, _ in _jobs(tmp_path, "same")] == ["pending", "pending"]

    (other / "m.yaml").write_text(MANIFEST.format(name="same", items=lone), encoding="utf-8")
    first.rename(e2e_env / "proj" / "old.yaml")  # the first project's manifest is gone from there
    assert run_main(["submit", "other/m.yaml"], monkeypatch) == 0
    assert _moved_lines(capsys.readouterr().err) == [
        f"batch same moved: its manifest is now other/m.yaml (was {first})"
    ]
