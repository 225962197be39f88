"""A local image is sent as the format in its bytes (what validation read), whatever its name.

JPEG bytes saved as ``images/noext`` or ``images/photo.heic`` pass validation (Pillow reads the
content); they used to be sent as ``application/octet-stream`` and ``image/heic`` (the type came
from the file name), so the export's ``input`` could not be fed back through ``items_from``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from falsim.server import SimulatorHandle
from jobs.settings import get_settings
from tests.e2e.e2e_helpers import EXAMPLES, MakeManifest, Wb, db_rows, export_jsonl

BODY = """\
name: misnamed
endpoint: fal-ai/wan-i2v
defaults:
  resolution: 480p
items:
  - prompt: no extension
    image_url: images/noext
    seed: 1
  - prompt: a JPEG named heic
    image_url: images/photo.heic
    seed: 2
"""


def _misnamed(manifest: MakeManifest) -> Path:
    """The manifest, beside a JPEG saved without extension and one named ``.heic``."""
    path = manifest("misnamed", BODY)
    for copy in ("noext", "photo.heic"):
        shutil.copy(EXAMPLES / "images" / "night.jpg", path.parent / "images" / copy)
    return path


def test_a_misnamed_jpeg_is_sent_as_jpeg_and_its_export_replays(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    path = _misnamed(manifest)
    assert wb("validate", path).code == 0
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    records = export_jsonl(wb, run.json()["batch"])
    assert [r["input"]["image_url"][:27] for r in records] == ["data:image/jpeg;base64,/9j/"] * 2

    # The exact submitted input, fed back as items_from rows, validates.
    replay = path.parent / "replay.jsonl"
    replay.write_text("".join(json.dumps(r["input"]) + "\n" for r in records))
    again = path.parent / "replay.yaml"
    again.write_text("name: replay\nendpoint: fal-ai/wan-i2v\nitems_from: replay.jsonl\n")
    checked = wb("validate", again)
    assert checked.code == 0, checked.stdout + checked.stderr


def test_a_misnamed_jpeg_is_uploaded_as_jpeg(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "100")  # the image is bigger: uploaded
    get_settings.cache_clear()
    path = _misnamed(manifest)
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 0, run.stderr
    (url,) = {r["input"]["image_url"] for r in export_jsonl(wb, run.json()["batch"])}  # one content
    key, name = (unquote(part) for part in urlsplit(url).path.split("/")[2:4])
    stored = sim.engine.store.get(key)
    assert stored is not None
    assert (stored.content_type, name.rsplit(".", 1)[-1]) == ("image/jpeg", "jpg")
    rows = db_rows(os.environ["WANBATCH_DATABASE_URL"], "SELECT content_type FROM uploads")
    assert rows == [("image/jpeg",)]
