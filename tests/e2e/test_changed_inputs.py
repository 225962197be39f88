"""Messages about input images changed after a submit (the auditor's findings).

* A batch whose jobs send several images, all rewritten after the submit: the failure summary
  of ``run`` and ``status`` named one file (``min(error)`` of the group) for failures spread
  over all of them.
* The manifest run again after an image was rewritten: the jobs of the old image were said to be
  "no longer in its manifest", as if the manifest had been edited; the image's bytes changed
  (so its jobs' keys), not the manifest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy.engine import Engine

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb


@pytest.fixture
def any_db(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both dialects; through ``engine``, which empties the shared PostgreSQL database after."""
    monkeypatch.setenv("WANBATCH_DATABASE_URL", db_url)
    return db_url


def _png(path: Path, shade: int) -> None:
    """A valid image for every endpoint (no alpha, 400 px a side); ``shade`` sets its bytes."""
    Image.new("RGB", (400, 400), (shade, 120, 200)).save(path, format="PNG")


def _two_images(name: str) -> str:
    """Twelve jobs: eight send images/p1.png, four images/p2.png."""
    return (
        f"name: {name}\nendpoint: fal-ai/wan-i2v\ndefaults: {{resolution: 480p}}\n"
        "matrix: {seed: [1, 2, 3, 4]}\nitems:\n"
        "  - {prompt: first, image_url: images/p1.png}\n"
        "  - {prompt: second, image_url: images/p1.png}\n"
        "  - {prompt: third, image_url: images/p2.png}\n"
    )


def test_the_failure_summary_names_every_changed_file(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    path = manifest("spread", _two_images("spread"))
    images = path.parent / "images"
    _png(images / "p1.png", 10)
    _png(images / "p2.png", 20)
    assert wb("submit", path).code == 0
    _png(images / "p1.png", 30)
    _png(images / "p2.png", 40)
    run = wb("run", "spread", "--no-progress")
    assert run.code == 1, run.stderr
    text = " ".join(run.stdout.split())
    assert "12 failed (input_file): media files 'images/p1.png' and 'images/p2.png' changed since" in text
    status = wb("status", "spread", "--json").json()
    (failure,) = status["failures"]
    assert failure["count"] == 12
    assert failure["distinct_errors"] == 2
    assert failure["example"].startswith("media file 'images/p")  # one job's error, as before
    assert failure["summary"].startswith("media files 'images/p1.png' and 'images/p2.png' changed since")
    human = " ".join(wb("status", "spread").stdout.split())
    assert "media files 'images/p1.png' and 'images/p2.png' changed since" in human
    assert sim.ledger()["accepted"] == 0


def _rewritten_after_submit(wb: Wb, manifest: MakeManifest) -> Path:
    """Batch sweep2 submitted (nothing sent), then its images/p3.png rewritten: its manifest's path."""
    body = (
        "name: sweep2\nendpoint: fal-ai/wan-i2v\ndefaults: {resolution: 480p}\nitems:\n"
        "  - {prompt: kept, image_url: images/landscape.jpg}\n"
        "  - {prompt: replaced, image_url: images/p3.png}\n"
    )
    path = manifest("sweep2", body)
    p3 = path.parent / "images" / "p3.png"
    _png(p3, 50)
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    _png(p3, 60)
    return path


def test_running_the_manifest_after_an_image_changed_names_the_image(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = _rewritten_after_submit(wb, manifest)
    run = wb("run", path, "--no-progress")
    assert run.code == 0, run.stderr
    err = " ".join(run.stderr.split())
    assert "images/p3.png changed since batch sweep2 was submitted (SHA-256 " in err
    assert "its 1 job(s) never sent are replaced by job(s) for the new image (dropped, cancelled)" in err
    assert "no longer in its manifest" not in err  # the manifest was not edited
    assert sim.ledger()["accepted"] == 2  # the kept job, and the new image's


def test_submit_json_names_the_changed_image_and_an_edit_keeps_its_line(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, any_db: str
) -> None:
    path = _rewritten_after_submit(wb, manifest)
    # An edit too: the first item's prompt changed (no file of it did).
    path.write_text(path.read_text().replace("prompt: kept", "prompt: edited"))
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    report = submitted.json()
    assert (report["not_in_manifest"], report["dropped"]) == (2, 2)  # counted as before
    (changed,) = report["changed_files"]
    assert changed["source"] == "images/p3.png"
    assert (changed["jobs"], changed["dropped"], changed["kept"], changed["ended_unsent"]) == (1, 1, 0, 0)
    assert changed["new_sha256"] not in changed["old_sha256"]
    old, new = changed["old_sha256"][0][:12], changed["new_sha256"][:12]
    err = " ".join(submitted.stderr.split())
    assert f"images/p3.png changed since batch sweep2 was submitted (SHA-256 {old}… → {new}…)" in err
    # The edited item's job: the manifest's own line, counting it alone.
    edited = "1 job(s) of batch sweep2 are no longer in its manifest: 1 never sent are dropped (cancelled)"
    assert edited in err
    assert sim.ledger()["accepted"] == 0


def test_a_sent_job_of_the_old_image_stays_and_the_new_image_is_sent(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = _rewritten_after_submit(wb, manifest)
    _png(path.parent / "images" / "p3.png", 50)  # the original back: the batch runs as submitted
    assert wb("run", path, "--no-progress").code == 0
    _png(path.parent / "images" / "p3.png", 60)
    again = wb("run", path, "--no-progress")
    assert again.code == 0, again.stderr
    err = " ".join(again.stderr.split())
    assert "images/p3.png changed since batch sweep2 was submitted" in err
    assert (
        "its 1 job(s) already sent stay in the batch (they may have been paid for), "
        "and job(s) for the new image are added"
    ) in err
    assert "no longer in its manifest:" not in err
    assert sim.ledger()["accepted"] == 3  # both jobs, then the new image's


def test_a_first_and_a_last_frame_both_rewritten_are_both_named(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """A job whose first and last frames were both rewritten was counted under its first file
    alone: the last was never named (not on stderr, not in ``changed_files``), and the user who
    put the first back found the job left out again. Each is named now, the job counted under
    both, and the line about an edit still counts the edited job alone."""
    body = (
        "name: frames\nendpoint: fal-ai/wan-flf2v\nitems:\n"
        "  - {prompt: one file, start_image_url: images/s.png, end_image_url: images/s.png}\n"
        "  - {prompt: two files, start_image_url: images/a.png, end_image_url: images/b.png}\n"
        "  - {prompt: kept, start_image_url: images/c.png, end_image_url: images/c.png}\n"
    )
    path = manifest("frames", body)
    images = path.parent / "images"
    for name, shade in (("s", 10), ("a", 20), ("b", 30), ("c", 40)):
        _png(images / f"{name}.png", shade)
    assert wb("submit", path, "--json").code == 0
    for name, shade in (("s", 11), ("a", 21), ("b", 31)):
        _png(images / f"{name}.png", shade)
    path.write_text(path.read_text().replace("prompt: kept", "prompt: edited"))
    submitted = wb("submit", path, "--json")
    assert submitted.code == 0, submitted.stderr
    report = submitted.json()
    assert (report["not_in_manifest"], report["dropped"]) == (3, 3)
    named = {c["source"]: (c["jobs"], c["dropped"]) for c in report["changed_files"]}
    assert named == {"images/a.png": (1, 1), "images/b.png": (1, 1), "images/s.png": (1, 1)}
    err = " ".join(submitted.stderr.split())
    for name in ("a", "b", "s"):
        assert f"images/{name}.png changed since batch frames was submitted" in err
    edited = "1 job(s) of batch frames are no longer in its manifest: 1 never sent are dropped (cancelled)"
    assert edited in err
    assert sim.ledger()["accepted"] == 0
