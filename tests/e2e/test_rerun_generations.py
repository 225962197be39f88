"""Reruns of reruns, on PostgreSQL: ``variant`` stays as small as the batch whatever ``--vary``
does generation after generation, ``diff`` still pairs each batch with its parent, and a source
file changed since the parent was submitted stops the rerun before anything is stored."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import create_engine, text

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, counts, db_rows, processed

# One item, two places in the manifest (480p, 720p), the seed pinned.
SIZES = """\
name: {name}
endpoint: fal-ai/wan-i2v
matrix:
  resolution: [480p, 720p]
items:
  - prompt: Cars racing in slow motion
    image_url: images/landscape.jpg
    seed: 1
"""


@pytest.fixture
def pg(new_pg_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A PostgreSQL database of this test's own: its INTEGER ``variant`` is what overflowed."""
    url = new_pg_database()
    monkeypatch.setenv("WANBATCH_DATABASE_URL", url)
    return url


def _jobs(url: str, batch: str) -> list[Any]:
    """``(id, item_index, variant, rerun_of, resolution, num_frames)`` of a batch's jobs."""
    return db_rows(
        url,
        "SELECT id, item_index, variant, rerun_of, input->>'resolution' AS resolution, "
        "input->>'num_frames' AS num_frames "
        f"FROM jobs WHERE batch_id = '{batch}' ORDER BY item_index, variant",
    )


@pytest.mark.slow
@pytest.mark.postgres
def test_rerun_chain_with_vary_keeps_variants_dense_and_diff_pairs_each_generation(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, pg: str
) -> None:
    parent = str(processed(wb, "run", manifest("chain", SIZES.format(name="chain")))["batch"])
    assert [row.variant for row in _jobs(pg, parent)] == [0, 1]  # the manifest's places

    batches = [parent]
    # Three values a generation, new ones each time. Every job of a resolution then asks what its
    # siblings ask, so each generation keeps 6 jobs: the first repeats of the parent's first 480p
    # and first 720p job. Numbered from the parent's (variant × 3 + n), the 720p ones went
    # 3-5, 9-11, 27-29, … — three times larger every generation until PostgreSQL refused them.
    for frames in ("82,83,84", "85,86,87", "88,89,90"):
        before = batches[-1]
        child = str(processed(wb, "rerun", before, "--vary", f"num_frames={frames}")["batch"])
        rows = _jobs(pg, child)
        assert len(rows) == 6
        assert [row.variant for row in rows] == list(range(6))  # dense within the item
        assert {(row.resolution, row.num_frames) for row in rows} == {
            (res, str(n)) for res in ("480p", "720p") for n in frames.split(",")
        }
        # Each job still names the job of the parent it repeats, of its own resolution.
        originals = {row.id: row for row in _jobs(pg, before)}
        for row in rows:
            assert originals[row.rerun_of].resolution == row.resolution

        done = wb("diff", before, child, "--json")
        assert done.code == 1, done.stderr  # other frame counts: other videos
        report = done.json()
        pairs = [p for p in report["jobs"] if p["a"] is not None and p["b"] is not None]
        assert pairs, report
        for pair in pairs:  # parent's job ↔ its own repeat, never a neighbour's
            assert pair["matched_by"] == "origin"
            mine = next(row for row in rows if row.id == pair["b"]["job_id"])
            assert mine.rerun_of == pair["a"]["job_id"]
        assert report["only_a"] + len(pairs) == len(originals)
        assert report["only_b"] + len(pairs) == 6
        batches.append(child)


@pytest.mark.slow
@pytest.mark.postgres
def test_vary_over_a_parent_with_a_large_variant_fits_postgresql(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, pg: str
) -> None:
    parent = str(processed(wb, "run", manifest("big", SIZES.format(name="big")))["batch"])
    # What a chain of reruns numbered by variant × K left behind (within PostgreSQL's INTEGER).
    engine = create_engine(pg)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE jobs SET variant = variant + 1000000000 WHERE batch_id = :batch"),
                {"batch": parent},
            )
    finally:
        engine.dispose()

    report = processed(wb, "rerun", parent, "--vary", "num_frames=82,83,84")

    assert report["total"] == 6
    assert report["counts"]["succeeded"] == 6
    assert [row.variant for row in _jobs(pg, str(report["batch"]))] == list(range(6))


def _repaint(image: Path) -> None:
    """Change one pixel of ``image`` and save it in place (an edit, as a user makes one)."""
    with Image.open(image) as opened:
        picture = opened.convert("RGB")
    pixel = picture.getpixel((0, 0))
    assert isinstance(pixel, tuple)
    picture.putpixel((0, 0), ((int(pixel[0]) + 128) % 256, *pixel[1:]))
    picture.save(image, format="JPEG", quality=95)


@pytest.mark.slow
@pytest.mark.postgres
def test_rerun_after_a_source_file_changed_is_refused_with_nothing_stored(
    wb: Wb, sim: SimulatorHandle, examples_copy: Path, pg: str, tmp_path: Path
) -> None:
    path = examples_copy / "seed-resolution-sweep.yaml"
    parent = str(processed(wb, "run", path, "--simulate")["batch"])
    image = examples_copy / "images" / "landscape.jpg"
    original = tmp_path / "landscape-original.jpg"
    shutil.copy(image, original)
    _repaint(image)
    stored, sent = counts(pg), sim.ledger()["accepted"]

    refused = wb("rerun", "seed-resolution-sweep", "--simulate", "--no-progress")

    assert refused.code == 2, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    head, *files = [line for line in refused.stderr.splitlines() if line.strip()]
    assert "cannot rerun batch seed-resolution-sweep: 1 source file differs" in head
    assert "nothing was stored" in head
    assert "Put the original file back to reproduce the batch" in head
    assert "submit the edited manifest as a new batch" in head
    assert len(files) == 1
    assert files[0].strip().startswith("images/landscape.jpg: changed since the batch was submitted")
    assert counts(pg) == stored  # no batch, no job
    assert sim.ledger()["accepted"] == sent

    as_json = wb("rerun", parent, "--simulate", "--no-progress", "--json")
    assert as_json.code == 2
    error = as_json.json()
    assert error["ok"] is False
    assert "Put the original file back" in error["error"]
    assert error["details"] == [files[0].strip()]  # the file, as the terminal lists it

    image.unlink()
    gone = wb("rerun", parent, "--simulate", "--vary", "seed=4..5", "--no-progress")
    assert gone.code == 2
    assert "  images/landscape.jpg: missing" in gone.stderr
    assert counts(pg) == stored

    # The original back: the rerun reproduces the parent byte for byte (a plain rerun keeps the
    # parent's $2.00 cap, though the parent spent $1.80 of it: only --failed-only gets what is left).
    shutil.copy(original, image)
    again = processed(wb, "rerun", parent, "--simulate")
    assert again["counts"]["succeeded"] == 6
    same = wb("diff", parent, str(again["batch"]), "--json")
    assert same.code == 0, same.stdout
    assert same.json()["same"] == 6
