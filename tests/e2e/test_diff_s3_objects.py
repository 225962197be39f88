"""``diff`` looks at S3 objects as it looks at local videos, without ``--verify``.

Found in review: a local video was looked at (one ``lstat``, its size against the recorded one)
but an S3 object only with ``--verify`` (which downloads and hashes every one), so an object
deleted from the bucket still read "same" (exit 0). Now each S3 object gets one ``HEAD`` (a few
at a time, within a time bound): one gone is ``missing``, one of another size ``changed on
disk``, and its pair is different. Objects that could not be looked up (the storage down) are
said in one line under the counts and compare by the recorded SHA-256, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import TWO_JOBS, MakeManifest, Wb, export_jsonl, processed
from tests.s3_helpers import MotoS3, aws_env

pytestmark = pytest.mark.s3

BUCKET = "wanbatch-diff"
LOCATION = f"s3://{BUCKET}/runs"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MotoS3]:
    with MotoS3() as server:
        aws_env(monkeypatch, server.url)
        monkeypatch.setenv("WANBATCH_OUTPUT_DIR", LOCATION)
        monkeypatch.setenv("WANBATCH_OUTPUT_STAGING_DIR", str(tmp_path / "staging"))
        monkeypatch.setenv("COLUMNS", "200")
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def _keys(wb: Wb, batch: str) -> dict[str, str]:
    """Job id → its video's key in the bucket."""
    return {r["job_id"]: r["video_path"].removeprefix(f"s3://{BUCKET}/") for r in export_jsonl(wb, batch)}


def test_an_object_deleted_or_replaced_in_s3_is_not_the_same_without_verify(
    wb: Wb, sim: SimulatorHandle, s3: MotoS3, manifest: MakeManifest
) -> None:
    parent = str(processed(wb, "run", manifest("s3diff", TWO_JOBS.format(name="s3diff")))["batch"])
    exact = str(processed(wb, "rerun", parent)["batch"])
    done = wb("diff", parent, exact, "--json")
    assert done.code == 0, done.stdout + done.stderr
    assert all(job["a"]["on_disk"] == job["b"]["on_disk"] == "ok" for job in done.json()["jobs"])

    client = s3.client()
    (first, replaced), (second, deleted) = sorted(_keys(wb, exact).items())
    client.put_object(Bucket=BUCKET, Key=replaced, Body=b"garbage")  # another size
    client.delete_object(Bucket=BUCKET, Key=deleted)

    done = wb("diff", parent, exact, "--json")
    assert done.code == 1, done.stdout + done.stderr
    report: dict[str, Any] = done.json()
    assert (report["same"], report["different"]) == (0, 2)
    by_b = {job["b"]["job_id"]: job for job in report["jobs"]}
    assert by_b[first]["b"]["on_disk"] == "changed on disk"
    assert "changed on disk" in by_b[first]["differs"]
    assert by_b[first]["b"]["video_path"] == f"s3://{BUCKET}/{replaced}"
    assert by_b[second]["b"]["on_disk"] == "missing"
    assert "missing on disk" in by_b[second]["differs"]
    assert all(job["a"]["on_disk"] == "ok" for job in report["jobs"])
    assert report["not_looked_up"] == 0

    human = wb("diff", parent, exact)
    assert human.code == 1
    assert "0 same, 2 different" in human.stdout
    assert "2 video(s) are not on disk as the database records them" in " ".join(human.stdout.split())


def test_objects_that_cannot_be_looked_up_are_said_and_compare_by_the_record(
    wb: Wb, sim: SimulatorHandle, s3: MotoS3, manifest: MakeManifest
) -> None:
    parent = str(processed(wb, "run", manifest("s3down", TWO_JOBS.format(name="s3down")))["batch"])
    exact = str(processed(wb, "rerun", parent)["batch"])
    s3.stop()
    done = wb("diff", parent, exact, "--json")
    assert done.code == 0, done.stdout + done.stderr  # the recorded SHA-256s are equal
    report: dict[str, Any] = done.json()
    assert report["not_looked_up"] == 4
    assert all(job["a"]["on_disk"] is None for job in report["jobs"])
    human = wb("diff", parent, exact)
    assert human.code == 0
    text = " ".join(human.stdout.split())
    assert "4 S3 object(s) could not be looked up" in text, human.stdout + human.stderr
    assert "compare by the SHA-256 the database records" in text
    assert "Traceback" not in human.stderr
