"""The bucket is a second record of what was paid for, as a local output folder is
(``tests/e2e/test_outputs_second_record.py``): with ``WANBATCH_OUTPUT_DIR=s3://bucket/prefix``
a job whose own sidecar object and video prove it was rendered is adopted, never sent again,
and a paid video of another request is never replaced by an upload: the new pair goes beside it.

The audit: both held for local folders only. A restored database backup with outputs in S3 sent
and billed every job rendered since the backup again, and each new upload replaced the paid video
and sidecar under the job's key (S3's ``PutObject`` replaces whatever is there).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from falsim.server import SimulatorHandle
from tests.e2e.e2e_helpers import MakeManifest, Wb, db_rows, processed
from tests.e2e.test_outputs_second_record import FIVE_JOBS, _Restorable, restorable  # noqa: F401
from tests.s3_helpers import MotoS3, aws_env, keys

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.s3

BUCKET = "wanbatch-restore"
LOCATION = f"s3://{BUCKET}/renders"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MotoS3]:
    with MotoS3() as server:
        aws_env(monkeypatch, server.url)
        monkeypatch.setenv("WANBATCH_OUTPUT_DIR", LOCATION)
        monkeypatch.setenv("WANBATCH_OUTPUT_STAGING_DIR", str(tmp_path / "staging"))
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def _objects(client: S3Client) -> dict[str, tuple[str, str]]:
    """Every object of the bucket → (its ETag, the SHA-256 of its bytes)."""
    found = {}
    for key in keys(client, BUCKET):
        answer = client.get_object(Bucket=BUCKET, Key=key)
        found[key] = (answer["ETag"], hashlib.sha256(answer["Body"].read()).hexdigest())
    return found


def _jobs(url: str) -> list[Any]:
    return db_rows(url, "SELECT id, state, request_id, output_path, output_sha256, actual_usd FROM jobs")


def _key(uri: str) -> str:
    return uri.removeprefix(f"s3://{BUCKET}/")


def _consistent(client: S3Client, url: str) -> None:
    """Every succeeded job's recorded object holds the recorded SHA-256, and the sidecar object
    beside it names the job's own request and that very object."""
    for job in _jobs(url):
        assert job.state == "succeeded", job
        body = client.get_object(Bucket=BUCKET, Key=_key(job.output_path))["Body"].read()
        assert hashlib.sha256(body).hexdigest() == job.output_sha256, job.output_path
        side = _key(job.output_path).removesuffix(".mp4") + ".json"
        sidecar = json.loads(client.get_object(Bucket=BUCKET, Key=side)["Body"].read())
        assert (sidecar["job_id"], sidecar["request_id"]) == (job.id, job.request_id), side
        assert sidecar["video_path"] == job.output_path


@pytest.mark.slow
def test_s3_a_restored_backup_adopts_what_the_bucket_proves_paid(
    wb: Wb,
    sim: SimulatorHandle,
    s3: MotoS3,
    manifest: MakeManifest,
    restorable: _Restorable,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = s3.client()
    path = manifest("restored", FIVE_JOBS.format(name="restored"))
    assert wb("submit", path).code == 0
    restorable.back_up()  # every job pending in the backup
    first = processed(wb, "run", path)
    assert first["counts"]["succeeded"] == 5
    assert sim.ledger()["billed_count"] == 5
    before = _objects(client)
    assert len(before) == 10  # a video and a sidecar per job
    paid = {job.id: job for job in _jobs(restorable.url)}

    url = restorable.restore()
    assert {job.state for job in _jobs(url)} == {"pending"}
    again = wb("run", path, "--json", "--no-progress")

    assert again.code == 0, again.stderr
    assert sim.ledger()["billed_count"] == 5  # nothing sent, nothing billed again
    report = again.json()
    assert report["counts"]["succeeded"] == 5
    assert report["adopted_from_outputs"] == 5
    assert report["spent_usd"] == first["spent_usd"]
    assert "job(s) adopted from outputs on disk" in caplog.text
    assert _objects(client) == before  # no object replaced, none added
    for job in _jobs(url):
        was = paid[job.id]
        assert (job.request_id, job.output_path, job.output_sha256) == (
            was.request_id,
            was.output_path,
            was.output_sha256,
        )
        assert job.output_path.startswith(f"{LOCATION}/restored/")
        assert float(job.actual_usd) == float(was.actual_usd)
    _consistent(client, url)


@pytest.mark.slow
def test_s3_an_object_of_another_request_is_never_replaced_the_new_pair_goes_beside_it(
    wb: Wb,
    sim: SimulatorHandle,
    s3: MotoS3,
    manifest: MakeManifest,
    restorable: _Restorable,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = s3.client()
    path = manifest("beside", FIVE_JOBS.format(name="beside"))
    assert wb("submit", path).code == 0
    restorable.back_up()
    processed(wb, "run", path)
    # One paid video changed in the bucket (same size, other bytes): its sidecar no longer
    # proves it, so the restored database sends that job again.
    video = sorted(k for k in keys(client, BUCKET) if k.endswith(".mp4"))[0]
    body = client.get_object(Bucket=BUCKET, Key=video)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=video, Body=body[:-1] + bytes([body[-1] ^ 1]))
    kept = _objects(client)

    url = restorable.restore()
    again = wb("run", path, "--json", "--no-progress")

    assert again.code == 0, again.stderr
    assert sim.ledger()["billed_count"] == 6  # only the job its bucket no longer proves
    assert again.json()["adopted_from_outputs"] == 4
    after = _objects(client)
    for key, stamp in kept.items():  # nothing that was there is replaced or removed
        assert after[key] == stamp, key
    stem = video.removesuffix(".mp4")
    added = sorted(set(after) - set(kept))
    (resent,) = [job for job in _jobs(url) if _key(job.output_path).startswith(stem)]
    assert added == [f"{stem}.{resent.request_id}.json", f"{stem}.{resent.request_id}.mp4"]
    assert _key(resent.output_path) == f"{stem}.{resent.request_id}.mp4"
    words = " ".join(caplog.text.split())
    assert "not overwritten" in words
    _consistent(client, url)
