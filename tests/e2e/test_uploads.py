"""Local images above the inline limit are uploaded once per distinct content and fal, then
reused while fal's storage keeps them: an expired upload, one fal says it can no longer
download, or one made to another fal is uploaded again."""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, update

from falsim.options import SimulatorOptions
from falsim.server import SimulatorHandle, running_simulator
from jobs.models import Upload
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
        os.environ["WANBATCH_DATABASE_URL"],
        "SELECT origin, content_sha256, provider_url, size_bytes FROM uploads",
    )
    assert rows == [(_origin(sim.url), hashlib.sha256(image).hexdigest(), url, len(image))]


def _origin(url: str) -> str:
    """``scheme://host:port`` of a simulator's URL (always with its port)."""
    return url.rstrip("/")


def _uploads(*columns: str) -> list[tuple[Any, ...]]:
    sql = f"SELECT {', '.join(columns)} FROM uploads"
    return [tuple(r) for r in db_rows(os.environ["WANBATCH_DATABASE_URL"], sql)]


@pytest.fixture
def upload_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANBATCH_INLINE_MAX_BYTES", "100")  # every example image is bigger: upload them
    get_settings.cache_clear()


@pytest.mark.usefixtures("upload_all")
def test_rerun_after_fal_storage_dropped_the_upload_uploads_it_again(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest
) -> None:
    """fal's storage dropped the file (a simulator reset stands in for its expiry): the rerun's
    jobs get fal's 422 "Failed to download the file" for the remembered URL; that upload is
    forgotten and each job is sent again, once, with the file uploaded anew."""
    path = manifest("uploads", SAME_IMAGE_TWICE)
    first = wb("run", path, "--json", "--no-progress")
    assert first.code == 0, first.stderr
    (old_url,) = {r["input"]["image_url"] for r in export_jsonl(wb, first.json()["batch"])}
    sim.reset()  # fal's storage no longer has the file

    rerun = wb("rerun", first.json()["batch"], "--json", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    records = export_jsonl(wb, rerun.json()["batch"])
    assert [r["status"] for r in records] == ["succeeded", "succeeded"]
    (new_url,) = {r["input"]["image_url"] for r in records}
    assert new_url != old_url
    assert new_url.startswith(sim.url)
    assert _uploads("provider_url") == [(new_url,)]
    # A later batch sends the new upload at once: no failed attempt.
    again = wb("rerun", rerun.json()["batch"], "--json", "--no-progress")
    assert again.code == 0, again.stderr
    assert [r["attempts"] for r in export_jsonl(wb, again.json()["batch"])] == [1, 1]


@pytest.mark.usefixtures("upload_all")
def test_an_expired_upload_is_not_sent(wb: Wb, sim: SimulatorHandle, manifest: MakeManifest) -> None:
    """An upload is reused for a day (fal keeps its files at least a week by default); after
    that, a job uploads the file again instead of sending a URL fal may have dropped."""
    path = manifest("uploads", SAME_IMAGE_TWICE)
    first = wb("run", path, "--json", "--no-progress")
    assert first.code == 0, first.stderr
    ((created, expires),) = _uploads("created_at", "expires_at")
    assert expires is not None
    assert expires > created
    engine = create_engine(os.environ["WANBATCH_DATABASE_URL"])
    try:
        with engine.begin() as conn:  # a day later
            conn.execute(update(Upload).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    finally:
        engine.dispose()
    sim.reset()
    rerun = wb("rerun", first.json()["batch"], "--json", "--no-progress")
    assert rerun.code == 0, rerun.stderr
    records = export_jsonl(wb, rerun.json()["batch"])
    assert [(r["status"], r["attempts"]) for r in records] == [("succeeded", 1), ("succeeded", 1)]
    assert sim.ledger()["accepted"] == 2  # no request was sent with the dead URL


@pytest.mark.usefixtures("upload_all")
def test_an_upload_to_another_fal_is_not_sent(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pointed at another fal, wanbatch uploads the file there: the first one's URL (here a
    loopback address) is never sent to it."""
    path = manifest("uploads", SAME_IMAGE_TWICE)
    first = wb("run", path, "--json", "--no-progress")
    assert first.code == 0, first.stderr
    with running_simulator(SimulatorOptions(latency_seconds=0.05, latency_jitter=0.0, rng_seed=7)) as other:
        monkeypatch.setenv("WANBATCH_FAL_QUEUE_URL", other.url)
        monkeypatch.setenv("WANBATCH_FAL_REST_URL", other.url)
        get_settings.cache_clear()
        rerun = wb("rerun", first.json()["batch"], "--json", "--no-progress")
        assert rerun.code == 0, rerun.stderr
        sent = {r["input"]["image_url"] for r in export_jsonl(wb, rerun.json()["batch"])}
        (url,) = sent
        assert url.startswith(other.url + "/"), url
        assert sorted(_uploads("origin")) == sorted([(_origin(sim.url),), (_origin(other.url),)])


@pytest.mark.usefixtures("upload_all")
def test_an_upload_fal_cannot_download_is_sent_again_only_once(
    wb: Wb, sim: SimulatorHandle, manifest: MakeManifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When even the new upload cannot be downloaded, the job fails (no loop of paid 422s),
    saying why; the dead upload is not remembered."""
    monkeypatch.setattr(sim.engine.store, "lookup_url", lambda _url: False)  # every file "gone"
    path = manifest(
        "uploads",
        SAME_IMAGE_TWICE.split("  - prompt: The same hills")[0],
    )
    run = wb("run", path, "--json", "--no-progress")
    assert run.code == 1, run.stderr
    (record,) = export_jsonl(wb, run.json()["batch"])
    assert record["status"] == "failed"
    assert record["attempts"] == 2  # WANBATCH_MAX_ATTEMPTS allows 3
    assert "Failed to download the file" in record["error"]
    assert "no longer had the uploaded copy" in record["error"]
    assert _uploads("provider_url") == []
