"""A rerun takes back the paid video a cancelled batch left in the staging folder.

The bucket fails, the batch is cancelled meanwhile: the waiting job fails ``output_not_kept``,
its billed cost recorded, its video kept in the staging folder. Before, ``rerun --failed-only``
sent that job to fal again and paid for the same video twice. Now the rerun's job takes that
very file (its SHA-256 and size checked against what the download recorded), uploads it with
a sidecar describing the original request, and succeeds with ``reused_from``, costing nothing;
a file that is not the one downloaded is refused, and said so. Steps driven directly, on both
databases, against moto's S3 server and a hostile fal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.models import BatchState, Job
from jobs.rerun import rerun_batch
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.s3_helpers import MotoS3, aws_env, keys, object_sha256
from tests.step_runtime import add_batch, make_runtime, settings_for, wait_until
from worker.steps import Runtime, dispatch, download, poll, submit

pytestmark = pytest.mark.s3

KEY = "s3-staged-rerun-key-5c10"
BUCKET = "wanbatch-staged"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    with MotoS3() as server:
        aws_env(monkeypatch, server.url)
        yield server


def _job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def _make_due(engine: Engine, job_id: str) -> None:
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(session, job_id, expected_version=job.version, next_attempt_at=None)


def _staged(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "staging").rglob("*") if p.is_file())


def left_staged(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, db_url: str, handed: list[str]
) -> tuple[Runtime, str]:
    """A paid job whose upload failed (no bucket) and whose batch was then cancelled: failed
    ``output_not_kept``, its video in the staging folder. Downloads handed on go to ``handed``."""
    settings = settings_for(
        hostile.url,
        KEY,
        output_dir=f"s3://{BUCKET}/out",
        output_staging_dir=tmp_path / "staging",
        download_attempts=2,
        database_url=db_url,
    )
    rt = make_runtime(engine, settings, enqueue_download=handed.append)
    add_batch(engine, "kept", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: _job(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    assert download(rt, job_id) == "upload-retry"
    with db.session_scope(engine) as session:
        batch_id = _job(engine, job_id).batch_id
        store.set_batch_state(session, batch_id, BatchState.CANCELLED, "cancelled by user")
    _make_due(engine, job_id)
    assert download(rt, job_id) == "failed"
    handed.clear()
    return rt, job_id


def test_rerun_failed_only_takes_the_staged_video_instead_of_paying_for_it_again(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3, db_url: str
) -> None:
    fal = FakeFal(hostile)
    handed: list[str] = []
    rt, job_id = left_staged(engine, hostile, tmp_path, db_url, handed)
    try:
        original = _job(engine, job_id)
        assert (original.state, original.error_type) == (JobState.FAILED, "output_not_kept")
        # what the download step recorded of the file it staged, before the cancel
        assert (original.output_sha256, original.output_bytes) == (
            hashlib.sha256(fal.video).hexdigest(),
            len(fal.video),
        )
        assert "`rerun --failed-only` takes this file back" in (original.error or "")
        (staged,) = _staged(tmp_path)

        s3.client().create_bucket(Bucket=BUCKET)  # the storage is back
        rerun = rerun_batch(original.batch_id, failed_only=True, settings=rt.settings)
        assert dispatch(rt) == []  # nothing sent to fal
        (taker,) = handed  # handed to a download instead
        assert _job(engine, taker).state == JobState.DOWNLOADING
        assert download(rt, taker) == "succeeded"
    finally:
        rt.client.close()
    job = _job(engine, taker)
    assert job.batch_id == rerun.batch_id
    assert (job.state, job.reused_from, job.rerun_of) == (JobState.SUCCEEDED, job_id, job_id)
    assert (job.actual_usd, job.actual_billing_units) == (Decimal(0), Decimal(0))  # nothing more paid
    assert job.seed == original.seed == 42
    assert fal.posts() == 1  # rendered once
    assert fal.file_gets("r1.mp4") == 1  # downloaded once
    assert _job(engine, job_id).actual_usd == original.est_usd  # the original keeps its bill
    client = s3.client()
    key = (job.output_path or "").removeprefix(f"s3://{BUCKET}/")
    assert key.startswith("out/kept-rerun-1/")
    assert object_sha256(client, BUCKET, key) == job.output_sha256 == original.output_sha256
    assert keys(client, BUCKET) == [key[:-4] + ".json", key]
    sidecar = json.loads(client.get_object(Bucket=BUCKET, Key=key[:-4] + ".json")["Body"].read())
    assert sidecar["job_id"] == taker
    assert sidecar["reused_from"] == job_id
    assert sidecar["request_id"] == original.request_id == "r1"
    assert sidecar["input"] == original.submitted_input is not None
    assert sidecar["seed"] == 42
    assert sidecar["provider_output"] == original.provider_output
    assert (sidecar["cost_usd"], sidecar["video_sha256"]) == ("0", original.output_sha256)
    assert not staged.exists()  # stored: not left behind


def test_a_rerun_of_a_staged_video_waits_in_downloading_while_the_storage_is_still_down(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3, db_url: str
) -> None:
    """A plain rerun (not --failed-only) takes it too; its upload fails like any other, and is
    retried from the same staged file, never sent to fal."""
    fal = FakeFal(hostile)
    handed: list[str] = []
    rt, job_id = left_staged(engine, hostile, tmp_path, db_url, handed)
    try:
        (staged,) = _staged(tmp_path)
        rerun_batch(_job(engine, job_id).batch_id, settings=rt.settings)
        assert dispatch(rt) == []
        (taker,) = handed
        assert download(rt, taker) == "upload-retry"  # no bucket yet
        job = _job(engine, taker)
        assert (job.state, job.download_attempts, job.est_usd) == (JobState.DOWNLOADING, 1, Decimal(0))
        assert staged.exists()

        s3.client().create_bucket(Bucket=BUCKET)
        _make_due(engine, taker)
        assert download(rt, taker) == "succeeded"
    finally:
        rt.client.close()
    job = _job(engine, taker)
    assert (job.state, job.reused_from, job.actual_usd) == (JobState.SUCCEEDED, job_id, Decimal(0))
    assert fal.posts() == 1
    assert _staged(tmp_path) == []


def test_a_staged_file_that_is_not_the_one_downloaded_is_not_taken(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    s3: MotoS3,
    db_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Same size, other bytes: refused, said so, and the job is sent as a rerun would be."""
    FakeFal(hostile)
    handed: list[str] = []
    rt, job_id = left_staged(engine, hostile, tmp_path, db_url, handed)
    try:
        (staged,) = _staged(tmp_path)
        data = bytearray(staged.read_bytes())
        data[-1] ^= 0xFF
        staged.write_bytes(bytes(data))
        s3.client().create_bucket(Bucket=BUCKET)
        rerun = rerun_batch(_job(engine, job_id).batch_id, failed_only=True, settings=rt.settings)
        with caplog.at_level(logging.WARNING, logger="worker.steps.dispatch"):
            (sent,) = dispatch(rt)
    finally:
        rt.client.close()
    assert handed == []
    job = _job(engine, sent)
    assert (job.batch_id, job.state, job.reused_from) == (rerun.batch_id, JobState.SUBMITTING, None)
    (warning,) = [r.getMessage() for r in caplog.records if "not taken" in r.getMessage()]
    assert f"the paid video job {job_id} left in the staging folder is not taken: {staged}" in warning
    assert "has another SHA-256" in warning
    assert staged.read_bytes() == bytes(data)  # never removed: not ours to judge


def test_a_staged_file_that_changes_after_the_rerun_took_it_fails_the_job_unpaid(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3, db_url: str
) -> None:
    """Checked again when stored: another file is never uploaded as the job's video, and the job
    is not sent either (it says so; a rerun of it renders it, at its price)."""
    fal = FakeFal(hostile)
    handed: list[str] = []
    rt, job_id = left_staged(engine, hostile, tmp_path, db_url, handed)
    try:
        (staged,) = _staged(tmp_path)
        s3.client().create_bucket(Bucket=BUCKET)
        rerun_batch(_job(engine, job_id).batch_id, failed_only=True, settings=rt.settings)
        assert dispatch(rt) == []
        (taker,) = handed
        staged.write_bytes(b"another file" * 10)
        assert download(rt, taker) == "failed"
    finally:
        rt.client.close()
    job = _job(engine, taker)
    assert (job.state, job.error_type) == (JobState.FAILED, "staged_output_changed")
    assert job.actual_usd == Decimal(0)
    assert (job.error or "").startswith(
        f"the paid video job {job_id} left in the staging folder is not taken: {staged} is 120 bytes"
    )
    assert keys(s3.client(), BUCKET) == []
    assert staged.read_bytes() == b"another file" * 10  # not ours: left as it is
    assert fal.posts() == 1
