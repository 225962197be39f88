"""An ``hf`` export carries the local input images its jobs sent (the auditor's finding).

The folder held the videos and each row's ``source_files``, a path relative to the original
manifest's folder, not the dataset's; an uploaded image's ``input.image_url`` is a storage URL
that expires. A dataset user could not pair an image-to-video output with its input. Now each
distinct local file is in ``inputs/<sha256><ext>``, checked against the SHA-256 its jobs
recorded, and each row's ``input_files`` names it; a file changed since is left out, and said.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb

#: Four jobs: two local images, two seeds each.
TWO_IMAGES = (
    "name: {name}\nendpoint: fal-ai/wan-i2v\ndefaults: {{resolution: 480p}}\n"
    "matrix: {{seed: [1, 2]}}\nitems:\n"
    "  - {{prompt: first, image_url: images/p1.png}}\n"
    "  - {{prompt: second, image_url: images/p2.png}}\n"
)


def _png(path: Path, shade: int) -> None:
    """A valid image for the endpoint (no alpha, 400 px a side); ``shade`` sets its bytes."""
    Image.new("RGB", (400, 400), (shade, 120, 200)).save(path, format="PNG")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_hf_export_copies_each_local_input_once_and_reports_a_changed_one(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, tmp_path: Path
) -> None:
    path = manifest("inputs", TWO_IMAGES.format(name="inputs"))
    images = path.parent / "images"
    _png(images / "p1.png", 10)
    _png(images / "p2.png", 20)
    sent = {
        "images/p1.png": images.joinpath("p1.png").read_bytes(),
        "images/p2.png": images.joinpath("p2.png").read_bytes(),
    }
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    batch = run.json()["batch"]

    folder = tmp_path / "hf"
    export = wb("export", batch, "--format", "hf", "-o", folder, "--json")
    assert export.code == 0, export.stderr
    assert export.json()["input_files"] == 2
    assert export.json()["input_files_not_copied"] == 0
    files = sorted(p.name for p in (folder / "inputs").iterdir())
    assert files == sorted(f"{hashlib.sha256(b).hexdigest()}.png" for b in sent.values())
    rows = _rows(folder)
    assert len(rows) == 4
    for row in rows:
        named = json.loads(str(row["input_files"]))
        assert set(named) == {"image_url"}
        source = json.loads(str(row["source_files"]))["image_url"]["source"]
        assert (folder / named["image_url"]).read_bytes() == sent[source]
        assert row["input_file_problems"] is None
    assert "`inputs/`" in (folder / "README.md").read_text()

    # p1.png rewritten after the run: its copy is not what the jobs sent, so it is left out,
    # its rows say why, and the export says how many in one warning line.
    _png(images / "p1.png", 30)
    changed = tmp_path / "hf-changed"
    export = wb("export", batch, "--format", "hf", "-o", changed)
    assert export.code == 0, export.stderr
    warnings = [line for line in export.stderr.splitlines() if "input file(s)" in line]
    assert len(warnings) == 1, export.stderr
    assert "1 input file(s) named by 2 row(s) were not copied" in warnings[0]
    assert [p.name for p in (changed / "inputs").iterdir()] == [f"{_sha256(images / 'p2.png')}.png"]
    for row in _rows(changed):
        source = json.loads(str(row["source_files"]))["image_url"]["source"]
        named = json.loads(str(row["input_files"]))
        if source == "images/p1.png":
            assert named == {"image_url": None}
            problems = json.loads(str(row["input_file_problems"]))
            assert problems["image_url"].startswith("images/p1.png: changed since the batch was submitted")
        else:
            assert (changed / named["image_url"]).read_bytes() == sent[source]
            assert row["input_file_problems"] is None
    assert sim.ledger()["accepted"] == 4
