"""Object storage (``jobs.output_store``) against moto's S3 server, step by step.

The download step driven directly against a hostile fal, on both databases, where ``wanbatch
run`` cannot easily show it: an upload that fails and is retried from the staged copy without a
new download, one that fails until the tries run out (the job fails with the reason and what
fal billed, the paid video kept). Then the store itself: multipart uploads (complete, or
aborted without a trace), reading objects back with their SHA-256 checked, presigned URLs,
the containment of local files, and the ``s3://`` form of ``WANBATCH_OUTPUT_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.errors import ConfigError
from jobs.manifest.expand import MAX_JOBS
from jobs.models import BatchState, Job, new_id
from jobs.output_location import S3_KEY_MAX_BYTES, prefix_room
from jobs.output_store import (
    LocalOutputStore,
    OutputReadError,
    OutputUploadError,
    S3OutputStore,
    fetch_output,
    open_output_store,
    output_size,
)
from jobs.outputs import OutputWriteError
from jobs.settings import Settings, get_settings
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.s3_helpers import SECRET_KEY, MotoS3, S3FaultProxy, aws_env, b64, keys, object_sha256
from tests.step_runtime import add_batch, make_runtime, settings_for, wait_until
from worker.steps import Runtime, adopt, dispatch, download, poll, schedule_downloads, submit

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.s3

KEY = "s3-steps-key-7d21"
BUCKET = "wanbatch-steps"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    with MotoS3() as server:
        aws_env(monkeypatch, server.url)
        yield server


def completed_job(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, **overrides: object
) -> tuple[Runtime, str]:
    """One job fal (``FakeFal``) has completed, outputs going to ``s3://wanbatch-steps/out``."""
    settings = settings_for(
        hostile.url,
        KEY,
        output_dir=f"s3://{BUCKET}/out",
        output_staging_dir=tmp_path / "staging",
        **overrides,
    )
    rt = make_runtime(engine, settings)
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: _job(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    return rt, job_id


def _job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def _make_due(engine: Engine, job_id: str) -> None:
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(session, job_id, expected_version=job.version, next_attempt_at=None)


def _staged(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "staging").rglob("*") if p.is_file())


def test_a_failed_upload_is_retried_from_the_staged_copy_without_a_new_download(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3
) -> None:
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)  # the bucket does not exist yet
    try:
        assert download(rt, job_id) == "upload-retry"
        job = _job(engine, job_id)
        assert job.state == JobState.DOWNLOADING
        assert job.download_attempts == 1
        assert job.output_path is None
        (staged,) = _staged(tmp_path)
        assert staged.read_bytes() == fal.video  # kept, whole
        assert fal.file_gets("r1.mp4") == 1

        client = s3.client()
        client.create_bucket(Bucket=BUCKET)  # the operator fixes the storage
        _make_due(engine, job_id)
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.output_path == f"s3://{BUCKET}/out/steps/{job.item_index:06d}-{job_id[:12]}.mp4"
    key = job.output_path.removeprefix(f"s3://{BUCKET}/")
    assert object_sha256(client, BUCKET, key) == job.output_sha256 == hashlib.sha256(fal.video).hexdigest()
    assert keys(client, BUCKET) == [key[:-4] + ".json", key]
    assert fal.file_gets("r1.mp4") == 1  # the retry uploaded the staged copy: no second download
    assert fal.posts() == 1  # and nothing was generated (or paid) twice
    assert _staged(tmp_path) == []  # gone once the success is stored


def test_a_staged_video_is_uploaded_under_the_place_a_resubmit_gave_its_job(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3
) -> None:
    """An edited manifest submitted again while a video waits staged (its upload failed) moves
    the job to another item: the staged copy, named by the old one, is still what is uploaded."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)  # the bucket does not exist yet
    try:
        assert download(rt, job_id) == "upload-retry"
        (staged,) = _staged(tmp_path)
        assert staged.name.startswith("000000-")
        job = _job(engine, job_id)
        with db.session_scope(engine) as session:  # an item inserted above the job's
            above = store.NewJob(f"{1:064x}", 0, "fal-ai/wan-22", {"prompt": "new"}, Decimal(5), Decimal(1))
            again = store.NewJob(job.job_key, 1, job.endpoint, job.input, job.est_billing_units, job.est_usd)
            moved = store.resubmit_jobs(session, job.batch_id, [above, again], lambda: 2)
        assert (moved.added, moved.present, moved.renumbered, moved.not_in_manifest) == (1, 1, 1, 0)

        s3.client().create_bucket(Bucket=BUCKET)
        _make_due(engine, job_id)
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert _job(engine, job_id).output_path == f"s3://{BUCKET}/out/steps/000001-{job_id[:12]}.mp4"
    assert fal.file_gets("r1.mp4") == 1  # the staged copy, not a second download
    assert _staged(tmp_path) == []


def test_uploads_failing_until_the_tries_run_out_pause_the_batch_and_keep_the_staged_video(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3
) -> None:
    """Before, the job then failed ("output not saved") and the batch went on sending into the
    same dead storage. Now the batch is paused with the reason; the job waits with its staged
    copy, and once the storage is back and the batch resumed, that copy is uploaded."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)  # no bucket yet
    try:
        assert download(rt, job_id) == "upload-retry"
        _make_due(engine, job_id)
        assert download(rt, job_id) == "outputs-paused"
        job = _job(engine, job_id)
        assert (job.state, job.error, job.download_attempts, job.lease_owner) == (
            JobState.DOWNLOADING,
            None,
            2,
            None,
        )
        (staged,) = _staged(tmp_path)
        assert staged.read_bytes() == fal.video
        with db.session_scope(engine) as session:
            batch = store.get_batch(session, job.batch_id)
        assert batch.state == BatchState.PAUSED
        reason = batch.pause_reason or ""
        assert reason.startswith(f"outputs cannot be stored: upload to s3://{BUCKET}/out/steps/{staged.name}")
        assert reason.endswith(
            f"(after 2 tries) — fix the storage; the videos already made wait in {staged.parent} and are "
            "uploaded once it takes them (the batch then resumes by itself) or by the next run, "
            "never made again"
        )
        assert SECRET_KEY not in reason

        s3.client().create_bucket(Bucket=BUCKET)  # the operator fixes the storage; runs the batch again
        with db.session_scope(engine) as session:
            assert store.resume_batch(session, job.batch_id)
        assert schedule_downloads(rt) == [job_id]
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert _job(engine, job_id).actual_usd == _job(engine, job_id).est_usd  # paid for, once
    assert _staged(tmp_path) == []
    assert fal.posts() == 1
    assert fal.file_gets("r1.mp4") == 1  # uploaded from the staged copy, never fetched again


def test_a_key_the_storage_refuses_as_too_long_pauses_at_once_and_says_to_shorten_it(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit: an S3 ``KeyTooLongError`` was retried like an outage, then paused the batch saying
    "fix the storage; … the batch then resumes by itself" — which it never would: the storage
    takes no such key. Now it is its own reason, permanent: the batch pauses on the first try."""
    fal = FakeFal(hostile)
    s3.client().create_bucket(Bucket=BUCKET)
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        proxy.limit_keys(20)  # a storage with a shorter limit than wanbatch's keys (out/steps/…)
        rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=5)
        try:
            assert download(rt, job_id) == "outputs-paused"
        finally:
            rt.client.close()
    job = _job(engine, job_id)
    assert job.download_attempts == 1
    (staged,) = _staged(tmp_path)
    assert staged.read_bytes() == fal.video  # the paid video is kept for a run that can store it
    with db.session_scope(engine) as session:
        batch = store.get_batch(session, job.batch_id)
    assert batch.state == BatchState.PAUSED
    reason = batch.pause_reason or ""
    assert reason == (
        f"outputs cannot be stored: upload to s3://{BUCKET}/out/steps/{staged.name} failed: the "
        "storage refused the key as too long (KeyTooLongError; S3 takes at most 1,024 bytes of UTF-8): "
        "shorten the prefix of WANBATCH_OUTPUT_DIR or the batch name (after 1 try) — the videos already "
        f"made wait in {staged.parent} and are uploaded by the next run under a shorter "
        "WANBATCH_OUTPUT_DIR prefix, never made again"
    )
    assert "fix the storage" not in reason
    assert "by itself" not in reason
    assert fal.posts() == 1


def test_an_upload_that_fails_in_a_cancelled_batch_says_where_the_paid_video_is_kept(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3
) -> None:
    """Audit: `cancel` during a storage outage failed the waiting jobs with the pause's text ("the
    videos already made wait in … and are uploaded once it takes them … or by the next run, never
    made again"): false — a cancelled batch is never run again, nothing uploads the staged copy.
    The error says so, and names the file the paid video is kept in (which stays)."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)  # no bucket yet
    try:
        assert download(rt, job_id) == "upload-retry"
        (staged,) = _staged(tmp_path)
        with db.session_scope(engine) as session:
            store.set_batch_state(
                session, _job(engine, job_id).batch_id, BatchState.CANCELLED, "cancelled by user"
            )
        _make_due(engine, job_id)
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert (job.state, job.error_type, job.download_attempts) == (JobState.FAILED, "output_not_kept", 2)
    error = job.error or ""
    assert error.startswith(
        "the batch was cancelled while its outputs could not be stored: this paid video is kept in "
        f"{staged.parent} as {staged.name} and nothing uploads it now"
    ), error
    assert "never made again" not in error
    assert "next run" not in error
    assert f"upload to s3://{BUCKET}/out/steps/{staged.name} failed" in error  # and why
    assert SECRET_KEY not in error
    assert _staged(tmp_path) == [staged]  # kept, whole
    assert staged.read_bytes() == fal.video
    assert job.actual_usd == job.est_usd  # fal made it: paid for
    assert fal.posts() == 1


def _paused_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and getattr(r, "event", None) == "download.outputs_paused"
    ]


def test_a_batch_paused_for_its_outputs_says_so_once_and_its_waiting_jobs_count_no_more_tries(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    s3: MotoS3,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Audit (S3 outage, 18 waiting jobs): every waiting job, at every failed try, logged the
    ~500-character warning "its output cannot be stored now; batch paused: …" although the batch
    was paused already (37 lines), and its "(after N tries)" went on to 3, 4, 5 with
    WANBATCH_DOWNLOAD_ATTEMPTS=2. Now the try that pauses the batch says so; the others wait
    quietly, and a try of a paused batch is not counted (it checks whether the storage is back)."""
    FakeFal(hostile)
    s3.client().create_bucket(Bucket=BUCKET)
    settings = settings_for(
        hostile.url,
        KEY,
        output_dir=f"s3://{BUCKET}/out",
        output_staging_dir=tmp_path / "staging",
        download_attempts=2,
    )
    rt = make_runtime(engine, settings)
    prompts = ("a paper boat", "a red kite", "a tin drum")
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in prompts])
    job_ids = dispatch(rt)
    assert len(job_ids) == 3
    for job_id in job_ids:
        assert submit(rt, job_id) == "submitted"
    wait_until(
        lambda: all(_job(engine, j).state == JobState.DOWNLOADING for j in job_ids), step=lambda: poll(rt)
    )
    caplog.set_level(logging.DEBUG, logger="worker.steps.download")
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        proxy.refuse_puts("/out/")  # the storage refuses every output now
        try:
            for job_id in job_ids:
                assert download(rt, job_id) == "upload-retry"
                _make_due(engine, job_id)
            for _round in range(3):  # the tries run out, then the paused batch tries again twice
                for job_id in job_ids:
                    assert download(rt, job_id) == "outputs-paused"
                    _make_due(engine, job_id)
            (warning,) = _paused_warnings(caplog)  # the try that paused the batch, not the 8 after it
            batch_id = _job(engine, job_ids[0]).batch_id
            with db.session_scope(engine) as session:  # run again while the storage still refuses
                assert store.resume_batch(session, batch_id)
            assert download(rt, job_ids[1]) == "outputs-paused"
        finally:
            rt.client.close()
    again = _paused_warnings(caplog)[1]  # paused again, at once, saying why without a false count
    assert "(its 2 tries had run out before; it failed again once the batch went on)" in again
    assert warning.startswith(f"job {job_ids[0]}: its output cannot be stored now; batch paused: ")
    assert "(after 2 tries)" in warning
    assert [_job(engine, j).download_attempts for j in job_ids] == [2, 2, 2]  # never past the setting
    with db.session_scope(engine) as session:
        batch = store.get_batch(session, _job(engine, job_ids[0]).batch_id)
    assert batch.state == BatchState.PAUSED
    assert "(its 2 tries had run out before; it failed again once the batch went on)" in (
        batch.pause_reason or ""
    )
    waiting = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "download.outputs_wait"]
    assert len(waiting) == 8  # each later try is still told, at INFO, briefly
    assert all(len(line) < 200 for line in waiting), waiting


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://u:PWSECRET1@127.0.0.1:9 ",  # a trailing space, as a .env file gives it
        "http://u:PWSECRET1@127.0.0.1:9/?x",
        " http://u:PW%20SECRET1@127.0.0.1:9/?x",
        "http://PWSECRET1@127.0.0.1:9/?x",  # over HTTP a user alone is the token
    ],
)
def test_botocores_messages_never_show_the_endpoints_password(
    endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audit: botocore's "Custom endpoint `http://u:PWSECRET1@…` was not a valid URI" reached
    `run`, `export` and the dashboard as it was. Every reason is masked, whatever made it."""
    aws_env(monkeypatch, endpoint)
    outputs = _store(tmp_path)
    with pytest.raises(OutputReadError) as signing:
        outputs.presigned_url(f"s3://{BUCKET}/p/video.mp4")
    with pytest.raises(OutputWriteError) as probing:
        outputs.check_writable()
    for caught in (signing, probing):
        message = str(caught.value)
        assert "SECRET1" not in message, message
        assert "127.0.0.1:9" in message  # still says which endpoint
        assert "\n" not in message


def _store(tmp_path: Path, **options: int) -> S3OutputStore:
    return S3OutputStore(bucket=BUCKET, prefix="p", staging=tmp_path / "staging", **options)


def test_large_videos_go_up_as_a_multipart_upload_with_a_sha256_per_part(tmp_path: Path, s3: MotoS3) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    data = os.urandom(11 * 1024 * 1024 + 17)  # three parts of 5 MiB, the last one short
    video = tmp_path / "big.mp4"
    video.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    sent: list[int] = []
    store_ = _store(tmp_path, multipart_threshold=1024 * 1024, part_size=5 * 1024 * 1024)
    store_.put_file(video, bucket=BUCKET, key="p/big.mp4", sha256=sha, size=len(data), progress=sent.append)
    assert object_sha256(client, BUCKET, "p/big.mp4") == sha
    head = client.head_object(Bucket=BUCKET, Key="p/big.mp4")
    assert head["Metadata"]["sha256"] == sha
    assert head["ContentLength"] == len(data)
    assert sent == [5 * 1024 * 1024, 10 * 1024 * 1024, len(data)]
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_a_multipart_upload_that_fails_is_aborted_and_leaves_no_object(
    tmp_path: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    data = os.urandom(11 * 1024 * 1024)
    video = tmp_path / "big.mp4"
    video.write_bytes(data)
    store_ = _store(tmp_path, multipart_threshold=1024 * 1024, part_size=5 * 1024 * 1024)
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        proxy.refuse_puts("partNumber=2")
        with pytest.raises(
            OutputUploadError, match=r"^upload to s3://wanbatch-steps/p/big.mp4 failed: access"
        ):
            store_.put_file(
                video, bucket=BUCKET, key="p/big.mp4", sha256=hashlib.sha256(data).hexdigest(), size=len(data)
            )
        assert proxy.rules.refused  # part 2 was refused
    assert keys(client, BUCKET) == []  # nothing under the final key
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []  # and no parts kept


def test_small_videos_carry_s3s_checksum(tmp_path: Path, s3: MotoS3) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\0\0\0\x18ftypmp42" + os.urandom(5000))
    sha = hashlib.sha256(video.read_bytes()).hexdigest()
    _store(tmp_path).put_file(video, bucket=BUCKET, key="p/v.mp4", sha256=sha, size=video.stat().st_size)
    head = client.head_object(Bucket=BUCKET, Key="p/v.mp4", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == b64(sha)
    assert head["Metadata"]["sha256"] == sha


def test_reading_an_object_back_checks_its_sha256(tmp_path: Path, s3: MotoS3) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="p/v.mp4", Body=b"the video")
    good = hashlib.sha256(b"the video").hexdigest()
    target = tmp_path / "v.mp4"
    assert fetch_output(f"s3://{BUCKET}/p/v.mp4", target, good) == "downloaded"
    assert target.read_bytes() == b"the video"
    other = tmp_path / "other.mp4"
    with pytest.raises(OutputReadError, match="changed since it was stored"):
        fetch_output(f"s3://{BUCKET}/p/v.mp4", other, "0" * 64)
    with pytest.raises(OutputReadError, match="the object does not exist"):
        fetch_output(f"s3://{BUCKET}/p/gone.mp4", other, good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]  # no partial file left
    assert output_size(f"s3://{BUCKET}/p/v.mp4") == len(b"the video")
    assert output_size(f"s3://{BUCKET}/p/gone.mp4") is None


def test_presigned_urls_serve_s3_outputs_and_local_files_stay_inside_the_folder(
    tmp_path: Path, s3: MotoS3
) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="p/v.mp4", Body=b"preview bytes")
    url = _store(tmp_path).presigned_url(f"s3://{BUCKET}/p/v.mp4", expires=60)
    assert url is not None
    assert SECRET_KEY not in url
    assert httpx.get(url).content == b"preview bytes"

    root = tmp_path / "outputs"
    (root / "b").mkdir(parents=True)
    inside = root / "b" / "v.mp4"
    inside.write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("no")
    local = LocalOutputStore(root=root)
    assert local.presigned_url(str(inside)) is None
    assert local.local_file(str(inside)) == inside.resolve()
    assert local.local_file(str(root / "b" / ".." / ".." / "secret.txt")) is None
    assert local.local_file(str(root / "b" / "missing.mp4")) is None
    assert local.local_file(f"s3://{BUCKET}/p/v.mp4") is None


def test_the_start_up_check_names_the_problem(
    tmp_path: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(OutputWriteError) as missing:
        _store(tmp_path).check_writable()
    assert str(missing.value) == (
        f"WANBATCH_OUTPUT_DIR 's3://{BUCKET}/p' cannot take the outputs: "
        f"the bucket '{BUCKET}' does not exist at {s3.url}"
    )
    s3.client().create_bucket(Bucket=BUCKET)
    _store(tmp_path).check_writable()
    assert keys(s3.client(), BUCKET) == []  # the probe object is removed again
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(OutputWriteError, match="no AWS credentials found: set AWS_ACCESS_KEY_ID"):
        _store(tmp_path).check_writable()


def test_the_start_up_check_says_when_outputs_cannot_be_read_back(
    tmp_path: Path, s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Credentials that may write but not read: reuse_outputs, `export --format hf` and the
    dashboard's previews need to read, so the probe reads its object back and says so."""
    s3.client().create_bucket(Bucket=BUCKET)
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        proxy.refuse_heads(".wanbatch-probe-")
        with pytest.raises(OutputWriteError) as unreadable:
            _store(tmp_path).check_writable()
        assert len(proxy.rules.refused) == 1
    assert str(unreadable.value) == (
        f"WANBATCH_OUTPUT_DIR 's3://{BUCKET}/p' takes the outputs but cannot read them back: "
        f"access denied to bucket '{BUCKET}' (check the credentials' rights and the bucket policy); "
        "reuse_outputs, `export --format hf` and the dashboard's previews read them (s3:GetObject, "
        "and s3:ListBucket so that a missing object is told from a refused one)"
    )
    assert keys(s3.client(), BUCKET) == []  # the probe object is removed all the same


# --------------------------------------------------------------------------- configuration


def test_output_dir_takes_an_s3_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "s3://Renders-Bucket/a/b/")
    monkeypatch.delenv("WANBATCH_OUTPUT_STAGING_DIR", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"WANBATCH_OUTPUT_DIR: .*not a valid bucket name"):
            get_settings()
        monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "s3://renders/a/b/")
        get_settings.cache_clear()
        settings = get_settings()
        assert settings.output_url == "s3://renders/a/b"
        assert settings.output_dir == Path(".wanbatch/staging")  # a local folder: the staging one
        assert open_output_store(settings).describe() == "s3://renders/a/b"
        monkeypatch.setenv("WANBATCH_OUTPUT_STAGING_DIR", str(tmp_path / "st"))
        get_settings.cache_clear()
        assert get_settings().output_dir == tmp_path / "st"
        monkeypatch.setenv("WANBATCH_OUTPUT_DIR", "s3://renders/a/../b")
        get_settings.cache_clear()
        with pytest.raises(ConfigError, match=r"WANBATCH_OUTPUT_DIR: .*'\.\.'"):
            get_settings()
        monkeypatch.setenv("WANBATCH_OUTPUT_DIR", str(tmp_path / "out"))
        get_settings.cache_clear()
        local = get_settings()
        assert local.output_url is None
        assert local.output_dir == tmp_path / "out"
        assert isinstance(open_output_store(local), LocalOutputStore)
    finally:
        get_settings.cache_clear()
    assert Settings(output_dir="s3://renders").output_url == "s3://renders"


def test_a_prefix_too_long_for_wanbatchs_keys_is_refused_by_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Audit: ``s3://renders/<990 × p>`` passed the settings and the start-up probe (whose key
    is shorter than a real one), and every upload then failed after its video was paid for. The
    bound is the longest key wanbatch makes (S3 takes 1024 bytes of UTF-8), counted in bytes."""
    room = prefix_room("")
    # The bound is the naming code's: a full-length slug, the highest item, a sidecar.
    store_ = S3OutputStore(bucket="renders", prefix="p" * room, staging=tmp_path)
    longest = store_.key("é" * 500, MAX_JOBS - 1, new_id(), ".json")  # slug: 100 chars, 200 bytes
    assert len(longest.encode()) == S3_KEY_MAX_BYTES
    monkeypatch.delenv("WANBATCH_OUTPUT_STAGING_DIR", raising=False)
    get_settings.cache_clear()
    try:
        for prefix in ("p" * 990, "p" * (room + 1), "é" * (room // 2 + 1), f"a/{'b' * (room - 1)}"):
            monkeypatch.setenv("WANBATCH_OUTPUT_DIR", f"s3://renders/{prefix}")
            get_settings.cache_clear()
            with pytest.raises(ConfigError) as refused:
                get_settings()
            message = str(refused.value)
            assert message.startswith("invalid configuration: WANBATCH_OUTPUT_DIR: the key prefix is ")
            assert f"so the prefix may be at most {room:,} bytes: shorten it" in message
            assert "\n" not in message
            assert prefix not in message
        for prefix in ("p" * room, "é" * (room // 2)):
            monkeypatch.setenv("WANBATCH_OUTPUT_DIR", f"s3://renders/{prefix}/")
            get_settings.cache_clear()
            assert get_settings().output_url == f"s3://renders/{prefix}"
    finally:
        get_settings.cache_clear()


def test_a_batch_whose_keys_cannot_fit_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """The same bound per batch, from its own slug (for a prefix that did not pass the settings)."""
    store_ = S3OutputStore(bucket="renders", prefix="p" * 990, staging=tmp_path)
    with pytest.raises(OutputWriteError) as refused:
        store_.check_names("a long night")  # 990 + "/a-long-night/" + "000000-<12 hex>" + ".json"
    assert str(refused.value) == (
        "WANBATCH_OUTPUT_DIR 's3://renders/" + "p" * 990 + "' cannot take the outputs of batch "
        "'a-long-night': its longest key would be 1,028 bytes of UTF-8, S3 takes at most 1,024 — "
        "shorten the prefix or the batch name"
    )
    store_.check_names("n")  # 990 + "/n/" + 19 + 5 = 1,017 bytes
    LocalOutputStore(root=tmp_path).check_names("n" * 500)  # a folder takes any name


def test_a_local_result_is_not_mistaken_for_an_old_staged_copy(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3
) -> None:
    """A staged file of the wrong size (not what fal described) is downloaded again."""
    fal = FakeFal(hostile)
    s3.client().create_bucket(Bucket=BUCKET)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    job = _job(engine, job_id)
    staged = tmp_path / "staging" / "steps" / f"{job.item_index:06d}-{job_id[:12]}.mp4"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"a torn file")
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert fal.file_gets("r1.mp4") == 1
    assert _job(engine, job_id).output_sha256 == hashlib.sha256(fal.video).hexdigest()
    assert not staged.exists()


def _publish(
    client: S3Client,
    store_: S3OutputStore,
    tmp_path: Path,
    data: bytes,
    request_id: str,
    stored_before: bool = False,
) -> tuple[str, dict[str, object]]:
    """``publish`` a staged video of ``data`` made by fal's ``request_id`` for job ``J`` at
    ``s3://…/p/b/000000-J.mp4``: the ``output_path`` it returns, and the sidecar it stored."""
    video = tmp_path / f"{request_id}.mp4"
    video.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    sidecar = {"job_id": "J", "request_id": request_id, "video_path": f"s3://{BUCKET}/p/b/000000-J.mp4"}
    where = store_.publish(
        video,
        location=f"s3://{BUCKET}/p/b/000000-J.mp4",
        sha256=sha,
        size=len(data),
        sidecar=sidecar,
        stored_before=stored_before,
    )
    side = where.removeprefix(f"s3://{BUCKET}/").removesuffix(".mp4") + ".json"
    return where, json.loads(client.get_object(Bucket=BUCKET, Key=side)["Body"].read())


def test_an_object_of_another_request_is_never_replaced_the_new_pair_goes_beside_it(
    tmp_path: Path, s3: MotoS3, caplog: pytest.LogCaptureFixture
) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    store_ = _store(tmp_path)
    first, _ = _publish(client, store_, tmp_path, b"paid by request one", "req-1")
    assert first == f"s3://{BUCKET}/p/b/000000-J.mp4"
    paid = {k: object_sha256(client, BUCKET, k) for k in keys(client, BUCKET)}

    second, sidecar = _publish(client, store_, tmp_path, b"paid by request two", "req-2")

    assert second == f"s3://{BUCKET}/p/b/000000-J.req-2.mp4"
    assert sidecar["request_id"] == "req-2"
    assert sidecar["video_path"] == second  # the sidecar names the object it describes
    assert (
        object_sha256(client, BUCKET, "p/b/000000-J.req-2.mp4")
        == hashlib.sha256(b"paid by request two").hexdigest()
    )
    for key, digest in paid.items():  # request one's pair is as it was
        assert object_sha256(client, BUCKET, key) == digest, key
    assert len(keys(client, BUCKET)) == 4
    assert "not overwritten" in caplog.text

    # The same request again (an earlier try stored it, then lost its lease): its own pair,
    # taken as stored, nothing beside it.
    again, _ = _publish(client, store_, tmp_path, b"paid by request two", "req-2", stored_before=True)
    assert again == second
    assert len(keys(client, BUCKET)) == 4


def test_a_video_without_its_sidecar_is_another_uploads_and_is_never_replaced(
    tmp_path: Path, s3: MotoS3
) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    # Another process's video, its sidecar not up yet (or another copy's, whose sidecar was lost).
    client.put_object(Bucket=BUCKET, Key="p/b/000000-J.mp4", Body=b"somebody else's")
    where, _ = _publish(client, _store(tmp_path), tmp_path, b"this request's", "req-9")
    assert where == f"s3://{BUCKET}/p/b/000000-J.req-9.mp4"
    body = client.get_object(Bucket=BUCKET, Key="p/b/000000-J.mp4")["Body"].read()
    assert body == b"somebody else's"
    # A sidecar of another request whose video is gone: neither is its key taken.
    client.put_object(Bucket=BUCKET, Key="p/b/000001-K.json", Body=b'{"request_id": "other"}')
    video = tmp_path / "k.mp4"
    video.write_bytes(b"k's video")
    location = f"s3://{BUCKET}/p/b/000001-K.mp4"
    sidecar = {"job_id": "K", "request_id": "req-k", "video_path": location}
    got = _store(tmp_path).publish(
        video, location=location, sha256=hashlib.sha256(b"k's video").hexdigest(), size=9, sidecar=sidecar
    )
    assert got == f"s3://{BUCKET}/p/b/000001-K.req-k.mp4"
    assert "p/b/000001-K.mp4" not in keys(client, BUCKET)  # taken back, not left beside a stranger's sidecar
    assert (
        client.get_object(Bucket=BUCKET, Key="p/b/000001-K.json")["Body"].read() == b'{"request_id": "other"}'
    )


def test_a_multipart_upload_is_conditional_too(tmp_path: Path, s3: MotoS3) -> None:
    client = s3.client()
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="p/b/000000-J.mp4", Body=b"somebody else's")
    store_ = _store(tmp_path, multipart_threshold=1024 * 1024, part_size=5 * 1024 * 1024)
    data = os.urandom(6 * 1024 * 1024)
    where, _ = _publish(client, store_, tmp_path, data, "req-big")
    assert where == f"s3://{BUCKET}/p/b/000000-J.req-big.mp4"
    assert client.get_object(Bucket=BUCKET, Key="p/b/000000-J.mp4")["Body"].read() == b"somebody else's"
    assert object_sha256(client, BUCKET, "p/b/000000-J.req-big.mp4") == hashlib.sha256(data).hexdigest()
    assert client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []  # the refused one aborted


def test_a_storage_that_cannot_be_asked_for_sidecars_adopts_nothing_and_says_so(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    s3: MotoS3,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The storage's own answer is the point, not its speed: on a loaded machine the first
    # client's start-up alone took longer than the round's 5 s ("no answer within 5 s").
    monkeypatch.setattr(adopt, "LOOKUP_DEADLINE", 60.0)
    FakeFal(hostile)
    rt, _job_id = completed_job(engine, hostile, tmp_path)  # no bucket: its sidecar cannot be read
    rt.client.close()
    words = " ".join(caplog.text.split())
    assert "could not look for its jobs' own sidecars in the output storage" in words
    assert "does not exist" in words  # why, in one line


def test_a_batch_paused_by_its_user_still_hears_that_its_outputs_cannot_be_stored(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    s3: MotoS3,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only the try that pauses the batch warned: a batch ``wanbatch pause`` had paused already
    (its reason "paused by user", nothing of the storage) is not paused again, so its jobs' tries
    ran out with INFO lines only, and a ``run`` collecting it waited without a word. The first
    try that cannot store an output of the batch warns now, once for the batch; later tries (of
    this job or another of the batch) stay quiet."""
    FakeFal(hostile)
    s3.client().create_bucket(Bucket=BUCKET)
    settings = settings_for(
        hostile.url,
        KEY,
        output_dir=f"s3://{BUCKET}/out",
        output_staging_dir=tmp_path / "staging",
        download_attempts=2,
    )
    rt = make_runtime(engine, settings)
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: _job(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    batch_id = _job(engine, job_id).batch_id
    with db.session_scope(engine) as session:  # wanbatch pause
        store.set_batch_state(session, batch_id, BatchState.PAUSED)
    caplog.set_level(logging.DEBUG, logger="worker.steps.download")
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        proxy.refuse_puts("/out/")
        try:
            assert download(rt, job_id) == "upload-retry"
            _make_due(engine, job_id)
            for _try in range(3):  # the try its tries run out on, then two more
                assert download(rt, job_id) == "outputs-paused"
                _make_due(engine, job_id)
        finally:
            rt.client.close()
    (warning,) = _paused_warnings(caplog)
    assert warning.startswith(f"job {job_id}: its output cannot be stored now; batch paused already")
    assert "(after 2 tries)" in warning
    with db.session_scope(engine) as session:
        assert store.get_batch(session, batch_id).pause_reason is None  # still the user's pause
