"""Hostile manifests and a hostile environment, through the CLI (issue #9, items 15, 17, 18, 10).

* Local files must resolve (symlinks included) inside the manifest's folder, unless the user
  allows another folder with ``--allow-dir`` or ``WANBATCH_ALLOWED_INPUT_DIRS``; a file swapped
  for a symlink, or rewritten, after validation is refused when the job is sent.
* A NUL character is a located validation error, also on PostgreSQL (which cannot store one).
* ``export --format csv`` neutralises formula-looking cells.
* ``run``/``rerun`` check the output folder before anything is stored or sent.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import EXAMPLES, MakeManifest, Wb, counts

LEAKY = """\
name: leaky
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: an ordinary job
    image_url: images/landscape.jpg
  - prompt: this one reads a private file
    image_url: {reference}
"""


@pytest.fixture
def private(tmp_path: Path) -> Path:
    """A folder beside the manifests' one holding a 'private' image."""
    folder = tmp_path / "private"
    folder.mkdir()
    shutil.copy(EXAMPLES / "images" / "night.jpg", folder / "passport.jpg")
    return folder


def _db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'wanbatch.db'}"


@pytest.mark.parametrize("command", ["validate", "estimate", "submit", "run"])
def test_every_command_refuses_a_file_outside_the_folder(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, private: Path, tmp_path: Path, command: str
) -> None:
    path = manifest("leaky", LEAKY.format(reference="../private/passport.jpg"))
    assert (path.parent / "../private/passport.jpg").is_file()
    done = wb(command, path, "--json")
    assert done.code == 2
    (issue,) = done.json()["issues"]
    assert (issue["line"], issue["item"], issue["field"]) == (9, 1, "image_url")
    assert "outside the manifest's folder" in issue["message"]
    assert "--allow-dir" in issue["allowed"]
    if (tmp_path / "wanbatch.db").exists():
        assert counts(_db(tmp_path)) == (0, 0)
    assert sim.ledger()["accepted"] == 0


@pytest.mark.parametrize("command", ["validate", "estimate", "submit"])
def test_allow_dir_lets_a_folder_in(wb: Wb, manifest: MakeManifest, private: Path, command: str) -> None:
    path = manifest("leaky", LEAKY.format(reference=private / "passport.jpg"))
    assert wb(command, path).code == 2
    allowed = wb(command, path, "--allow-dir", private)
    assert allowed.code == 0, allowed.stderr


def test_run_with_allow_dir_sends_the_allowed_file(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, private: Path
) -> None:
    path = manifest("leaky", LEAKY.format(reference=private / "passport.jpg"))
    run = wb("run", path, "--allow-dir", private, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    assert run.json()["counts"]["succeeded"] == 2


@pytest.mark.parametrize("separator", [os.pathsep, ","])
def test_the_allowed_input_dirs_setting(
    wb: Wb,
    manifest: MakeManifest,
    private: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    separator: str,
) -> None:
    path = manifest("leaky", LEAKY.format(reference=private / "passport.jpg"))
    monkeypatch.setenv(
        "WANBATCH_ALLOWED_INPUT_DIRS", separator.join([str(tmp_path / "elsewhere"), str(private)])
    )
    done = wb("validate", path)
    assert done.code == 0, done.stderr


def test_a_file_swapped_for_a_symlink_after_submit_is_not_sent(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, private: Path, tmp_path: Path
) -> None:
    path = manifest("swap", LEAKY.replace("leaky", "swap").format(reference="images/night.jpg"))
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    night = path.parent / "images" / "night.jpg"
    night.unlink()
    night.symlink_to(private / "passport.jpg")  # the stored (resolved) path now leads outside
    run = wb("run", path, "--json", "--no-progress")  # re-validation refuses the manifest…
    assert run.code == 2
    assert "outside the manifest's folder" in run.stdout
    worker = wb("run", "swap", "--json", "--no-progress")  # …and the stored job cannot leak it
    report = worker.json()
    assert report["counts"]["failed"] == 1
    assert report["counts"]["succeeded"] == 1
    assert any("symlink appeared after validation" in f["example"] for f in report["failures"])
    assert sim.ledger()["accepted"] == 1


def test_a_file_rewritten_after_submit_is_not_sent(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    # Validated as night.jpg, then overwritten in place (a valid image, other bytes): sending
    # it would pay for an input nobody validated, and the export would name the old hash.
    path = manifest("rewritten", LEAKY.replace("leaky", "rewritten").format(reference="images/night.jpg"))
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    shutil.copy(path.parent / "images" / "square.png", path.parent / "images" / "night.jpg")
    run = wb("run", "rewritten", "--json", "--no-progress")  # the stored batch, not the manifest again
    report = run.json()
    assert report["counts"]["failed"] == 1, run.stderr
    assert report["counts"]["succeeded"] == 1
    (failure,) = report["failures"]
    assert failure["error_type"] == "input_file"
    assert "changed since the manifest was validated" in failure["example"]
    assert sim.ledger()["accepted"] == 1
    # Never sent: no attempt, no request, nothing billed (README: a job never sent has `attempts` 0).
    records = [json.loads(line) for line in wb("export", "rewritten").stdout.splitlines()]
    (unsent,) = [r for r in records if r["status"] == "failed"]
    assert (unsent["attempts"], unsent["request_id"], unsent["submitted_at"]) == (0, None, None)
    assert unsent["cost_usd"] == 0


def test_nul_is_refused_before_postgresql_sees_it(
    wb: Wb, manifest: MakeManifest, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_DATABASE_URL", pg_url)
    path = manifest("nul", 'name: nul-test\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: "cars\\0racing"\n')
    done = wb("submit", path)
    assert done.code == 2
    assert "nul.yaml:4: item 0: field 'prompt': contains a NUL character" in done.stderr
    assert "Traceback" not in done.stderr
    assert all(b["name"] != "nul-test" for b in wb("status", "--json").json()["batches"])


def test_csv_export_neutralises_formulas(wb: Wb, manifest: MakeManifest) -> None:
    path = manifest(
        "formula",
        'name: "=HYPERLINK(\\"http://evil.example\\")"\nendpoint: fal-ai/wan-22\nitems:\n  - prompt: hi\n',
    )
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    exported = wb("export", submitted.json()["batch"], "--format", "csv")
    (row,) = csv.DictReader(io.StringIO(exported.stdout))
    assert row["batch_name"] == '\'=HYPERLINK("http://evil.example")'


def test_run_checks_the_output_folder_before_anything_is_stored_or_sent(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = manifest("ok", LEAKY.replace("leaky", "ok").format(reference="images/night.jpg"))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(blocker))
    run = wb("run", path, "--no-progress")
    assert run.code == 2
    assert len(run.stderr.strip().splitlines()) == 1
    assert "WANBATCH_OUTPUT_DIR" in run.stderr
    assert "nothing was sent" in run.stderr
    assert not (tmp_path / "wanbatch.db").exists() or counts(_db(tmp_path)) == (0, 0)
    assert sim.ledger()["accepted"] == 0

    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "outputs"))
    assert wb("run", path, "--no-progress").code == 0
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(blocker / "sub"))
    rerun = wb("rerun", "ok", "--no-progress")
    assert rerun.code == 2
    assert "WANBATCH_OUTPUT_DIR" in rerun.stderr
    assert counts(_db(tmp_path)) == (1, 2)  # no rerun batch was made, no job claimed
    assert sim.ledger()["accepted"] == 2


def test_a_file_gone_or_changed_after_submit_is_named_as_the_manifest_wrote_it(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """The job's error (stored, shown by `status`, exported) named the absolute path stored
    (`/tmp/…/images/…`), not the file as the manifest wrote it; a line feed in it stays escaped.
    A file gone pauses the batch (nothing sent: it waits for the file), named the same way."""
    body = LEAKY.replace("leaky", "named").format(reference="./images/../images/night.jpg")
    body = body.replace("images/landscape.jpg", '"images/gone\\n✓ ok.jpg"')
    path = manifest("named", body)
    images = path.parent / "images"
    gone = images / "gone\n✓ ok.jpg"
    shutil.copy(images / "landscape.jpg", gone)
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    gone.unlink()
    shutil.copy(images / "square.png", images / "night.jpg")
    run = wb("run", "named", "--json", "--no-progress")
    assert run.code == 2, run.stderr
    assert "input missing: media file 'images/gone\\n✓ ok.jpg' does not exist" in run.json()["error"]
    assert str(path.parent) not in run.json()["error"]
    shutil.copy(images / "landscape.jpg", gone)  # the file is back: the run goes on
    run = wb("run", "named", "--json", "--no-progress")
    assert run.json()["counts"]["failed"] == 1, run.stderr
    exported = wb("export", "named", "--format", "jsonl")
    errors = sorted(str(json.loads(line)["error"]) for line in exported.stdout.splitlines())
    assert errors == [
        "None",
        "media file 'images/night.jpg' changed since the manifest was validated (its bytes differ); "
        "not sent: put the original back, or submit the manifest again to validate the new one",
    ]
    status = wb("status", "named", "--json").json()
    assert all(str(path.parent) not in f["example"] for f in status["failures"])
    assert sim.ledger()["accepted"] == 1
