"""Messages about input images changed after a submit (the auditor's findings).

* A batch whose jobs send several images, all rewritten after the submit: the failure summary
  of ``run`` and ``status`` named one file (``min(error)`` of the group) for failures spread
  over all of them.
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
