"""Local images above the inline limit are uploaded once per distinct content, then reused."""

from __future__ import annotations

import hashlib
import os

import pytest

from falsim.server import SimulatorHandle
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import MakeManifest, Wb, db_rows, export_jsonl

SAME_IMAGE_TWICE = """\
name: uploads
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: Clouds drifting past the peak
    image_url: images/landscape.jpg
    seed: 1
  - prompt: The same hills, a moment later
    image_url: images/landscape.jpg
    seed: 2
"""


def test_large_local_image_is_uploaded_once_and_sent_by_url(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "100")  # every example image is bigger: upload them
    get_settings.cache_clear()
    path = manifest("uploads", SAME_IMAGE_TWICE)
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    records = export_jsonl(wb, run.json()["batch"])
    sent = {r["input"]["image_url"] for r in records}
    assert len(sent) == 1, "both jobs send the one uploaded URL"
    (url,) = sent
    assert url.startswith(sim.url), url  # a storage URL, not a data URI or a local path

    image = (path.parent / "images" / "landscape.jpg").read_bytes()
    rows = db_rows(
        os.environ["WANBATCH_DATABASE_URL"], "SELECT content_sha256, provider_url, size_bytes FROM uploads"
    )
    assert rows == [(hashlib.sha256(image).hexdigest(), url, len(image))]
