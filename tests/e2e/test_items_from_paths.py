"""An ``items_from`` row's local path is relative to the manifest, as the contract says.

wanbatch read it relative to the row's own file: ``data/rows.jsonl``'s ``images/landscape.jpg``
sent ``data/images/landscape.jpg`` while the manifest's folder held another
``images/landscape.jpg``, and the export said ``images/landscape.jpg``: a different image, paid
for without a word. Now both there and different is refused; a file only beside the rows is
still read (old projects keep working), with a warning, and recorded relative to the manifest;
and a batch stored before keeps what it recorded (``rerun`` sends that file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, counts, db_rows, export_jsonl

BODY = "name: {name}\nendpoint: fal-ai/wan-i2v\ndefaults: {{resolution: 480p}}\nitems_from: data/rows.jsonl\n"


def _rows(folder: Path, image: str) -> None:
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "rows.jsonl").write_text(json.dumps({"prompt": "the row", "image_url": image}) + "\n")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_row_path_naming_two_different_files_is_refused(
    wb: Wb, manifest: MakeManifest, e2e_env: Path
) -> None:
    """The audit's layout: nothing is validated as fine, nothing stored; one line names both."""
    path = manifest("two", BODY.format(name="two"))
    _rows(e2e_env, "images/landscape.jpg")
    (e2e_env / "data" / "images").mkdir()
    shutil.copy(e2e_env / "images" / "night.jpg", e2e_env / "data" / "images" / "landscape.jpg")
    for command in ("validate", "submit"):
        done = wb(command, path)
        assert done.code == 2, (command, done.stdout, done.stderr)
        [line] = [ln for ln in (done.stdout + done.stderr).splitlines() if "two different files" in ln]
        assert "data/rows.jsonl:1: item 0: field 'image_url'" in line
        assert "images/landscape.jpg in the manifest's folder" in line
        assert "data/images/landscape.jpg beside this items file" in line
    assert counts(os.environ["WANBATCH_DATABASE_URL"]) == (0, 0)


@pytest.mark.slow
def test_a_batch_stored_before_keeps_what_it_recorded(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, e2e_env: Path
) -> None:
    """A row's ``pics/landscape.jpg`` only beside the rows: read there, with a warning, and
    recorded as ``data/pics/landscape.jpg``. A batch that recorded it the old way (as the row
    wrote it) keeps its record and its file: ``rerun`` sends that file, and a resubmit finding a
    different ``pics/landscape.jpg`` in the manifest's folder is refused, changing nothing;
    once that file is gone, the resubmit is the same job, its record spelled as the contract
    reads it."""
    url = os.environ["WANBATCH_DATABASE_URL"]
    path = manifest("old", BODY.format(name="old"))
    _rows(e2e_env, "pics/landscape.jpg")
    theirs = e2e_env / "data" / "pics" / "landscape.jpg"
    theirs.parent.mkdir()
    shutil.copy(e2e_env / "images" / "landscape.jpg", theirs)
    digest = _sha(theirs)

    done = wb("run", path, "--json", "--no-progress")
    assert done.code == 0, done.stderr
    assert (
        "'pics/landscape.jpg' is not in the manifest's folder: read as data/pics/landscape.jpg" in done.stderr
    )
    [record] = export_jsonl(wb, "old")
    assert record["source_files"] == {"image_url": {"source": "data/pics/landscape.jpg", "sha256": digest}}

    # As a batch submitted before this version recorded it: the path as the row wrote it.
    old = json.dumps({"image_url": {"source": "pics/landscape.jpg", "sha256": digest}})
    [(job_id, stored_input)] = db_rows(url, "SELECT id, input FROM jobs")
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        conn.execute("UPDATE jobs SET source_files = ? WHERE id = ?", (old, job_id))
    assert json.loads(stored_input)["image_url"] == str(theirs.resolve())

    # A different image now where the contract looks: the resubmit is refused, nothing changes.
    mine = e2e_env / "pics" / "landscape.jpg"
    mine.parent.mkdir()
    shutil.copy(e2e_env / "images" / "night.jpg", mine)
    again = wb("submit", path)
    assert again.code == 2
    assert "names two different files" in again.stdout + again.stderr
    assert counts(url) == (1, 1)
    assert json.loads(db_rows(url, "SELECT source_files FROM jobs")[0][0]) == json.loads(old)

    # The stored batch keeps what it recorded: a rerun sends the file its job resolved to.
    rerun = wb("rerun", "old", "--json", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    rerun_job = [
        (json.loads(i)["image_url"], json.loads(s))
        for i, s, b in db_rows(url, "SELECT input, source_files, batch_id FROM jobs")
        if b == str(rerun.json()["batch"])
    ]
    assert rerun_job == [(str(theirs.resolve()), json.loads(old))]

    # The manifest's folder has no such file again: the same job, its record now the contract's.
    mine.unlink()
    again = wb("submit", path, "--json")
    assert again.code == 0, again.stderr
    assert counts(url) == (2, 2)  # the batch and its rerun: no new job
    [record] = export_jsonl(wb, "old")
    assert record["source_files"] == {"image_url": {"source": "data/pics/landscape.jpg", "sha256": digest}}
    assert record["status"] == "succeeded"
