"""The lease of a download while its output is stored, against a slow or failing storage.

Audit (S3): an upload waits on the storage's answer, and nothing renewed the job's lease
meanwhile (the download's keeper ran per chunk of the body, which S3's client reads whole
before it waits): a storage answering later than ``WANBATCH_LEASE_SECONDS`` had the job taken
over, its success refused to the try that stored it ("lost-lease", silently), and the next try
uploaded it again, and again — a batch that never ended. Worse, a try whose sidecar upload then
failed removed the video the next holder had stored and recorded as the job's output: the
bucket kept only the sidecar, the job said ``succeeded``.

Now one thread per runtime keeps the lease while the output is stored, a try removes what it
stored only while it still holds the lease (and only the object it wrote), a lost lease is
said, and the next holder does not upload again what is stored. The local output folder
follows the same rule. Each test drives the download step of two "workers" (runtimes), a
fault proxy in front of moto standing for the slow storage.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from jobs import db, outputs, store
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.s3_helpers import MotoS3, S3FaultProxy, aws_env, keys, object_sha256
from tests.step_runtime import add_batch, make_runtime, settings_for, wait_until
from worker.runtime import close_runtime
from worker.steps import Runtime, dispatch, download, poll, schedule_downloads, submit

pytestmark = pytest.mark.s3

KEY = "output-lease-key-5e02"
BUCKET = "wanbatch-lease"


@pytest.fixture
def s3() -> Iterator[MotoS3]:
    with MotoS3() as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def made() -> Iterator[list[Runtime]]:
    runtimes: list[Runtime] = []
    yield runtimes
    for rt in runtimes:
        close_runtime(rt)


def _completed_job(
    engine: Engine,
    hostile: HostileProvider,
    made: list[Runtime],
    output_dir: str | Path,
    tmp_path: Path,
    **overrides: Any,
) -> tuple[Runtime, Runtime, str]:
    """One job fal has completed, and two workers of it: the first to download it, the other
    to take it over should its lease run out."""
    settings = settings_for(
        hostile.url, KEY, output_dir=output_dir, output_staging_dir=tmp_path / "staging", **overrides
    )
    rt = make_runtime(engine, settings)
    other = make_runtime(engine, settings)
    other.owner = "other-worker:2:2"
    made += [rt, other]
    add_batch(engine, "lease", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: _job(engine, job_id).state == JobState.DOWNLOADING, step=lambda: poll(rt))
    return rt, other, job_id


def _job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def _in_background(fn: Any, *args: Any) -> tuple[threading.Thread, list[str]]:
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(fn(*args)), daemon=True)
    thread.start()
    return thread, outcome


def _lapse(engine: Engine, job_id: str) -> None:
    """The first worker stalls past its lease (a frozen process: it renews nothing): the
    lease is made to have run out, without moving the version it holds the job by."""
    job = _job(engine, job_id)
    with db.session_scope(engine) as session:
        assert store.update_job_fields(
            session, job_id, expected_version=job.version, lease_expires_at=utcnow() - timedelta(seconds=1)
        )


def test_a_try_that_lost_its_lease_never_removes_the_video_the_next_one_recorded(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    s3: MotoS3,
    made: list[Runtime],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Audit: the first PUT of the sidecar answered 403 after the lease ran out, meanwhile the
    next holder stored video and sidecar and recorded the success; the first try then DELETEd
    the video: only the .json stayed, `export --format hf` said "video is missing"."""
    fal = FakeFal(hostile)
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        proxy.hold_first_puts(".json")
        rt, other, job_id = _completed_job(engine, hostile, made, f"s3://{BUCKET}/out", tmp_path)
        first, outcome = _in_background(download, rt, job_id)
        assert proxy.rules.held.wait(30)  # the video is stored; its sidecar's answer is late
        _lapse(engine, job_id)
        assert schedule_downloads(other) == [job_id]
        with caplog.at_level(logging.WARNING):
            assert download(other, job_id) == "succeeded"
            proxy.rules.release.set()  # the first try's sidecar upload is refused now
            first.join(30)
        puts = dict(proxy.rules.puts)
    job = _job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.output_path is not None
    key = job.output_path.removeprefix(f"s3://{BUCKET}/")
    client = s3.client()
    assert keys(client, BUCKET) == [key[:-4] + ".json", key]  # the video is still there
    assert outcome == ["lost-lease"]
    assert object_sha256(client, BUCKET, key) == job.output_sha256
    assert puts[f"/{BUCKET}/{key}"] == 1  # the next holder found it stored: not sent again
    assert fal.file_gets("r1.mp4") == 1
    assert fal.posts() == 1
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        m.startswith(f"job {job_id}: its lease was taken over while its output was being stored at s3://")
        and "WANBATCH_LEASE_SECONDS=120" in m
        for m in said
    ), said


def test_a_storage_slower_than_the_lease_keeps_the_job_its_uploaders(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    s3: MotoS3,
    made: list[Runtime],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Audit: every PUT answered 12 s late with WANBATCH_LEASE_SECONDS=20: each upload
    outlived its lease, the job was taken over and uploaded again, 6 to 26 times, for ever,
    silently. Now the lease is kept while the output is stored: nobody takes the job over."""
    FakeFal(hostile)
    with S3FaultProxy(s3.port) as proxy:
        aws_env(monkeypatch, proxy.url)
        rt, other, job_id = _completed_job(
            engine, hostile, made, f"s3://{BUCKET}/out", tmp_path, lease_seconds=3.0
        )
        proxy.delay_puts("/out/", 2.0)  # video and sidecar: 4 s in all, past the 3 s lease
        first, outcome = _in_background(download, rt, job_id)
        taken: list[str] = []
        while first.is_alive():  # the other worker's tick, looking for lapsed leases
            taken += schedule_downloads(other)
            first.join(0.1)
        puts = dict(proxy.rules.puts)
    assert taken == []
    assert outcome == ["succeeded"]
    job = _job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.output_path is not None
    assert puts[job.output_path.removeprefix("s3:/")] == 1


def test_a_local_output_is_never_removed_by_a_try_that_lost_its_lease(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    made: list[Runtime],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The local folder had the same clean-up: a sidecar that could not be written (a full
    disk) removed the video under the job's name — the next holder's recorded output, once the
    lease had moved on."""
    FakeFal(hostile)
    rt, other, job_id = _completed_job(engine, hostile, made, tmp_path / "out", tmp_path)
    real = outputs.write_json_atomic
    held, release = threading.Event(), threading.Event()
    slow: list[threading.Thread] = []

    def write_json_atomic(*args: Any, **kwargs: Any) -> None:
        if threading.current_thread() in slow:  # the first try: its disk fills up, late
            held.set()
            release.wait(30)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)

    monkeypatch.setattr(outputs, "write_json_atomic", write_json_atomic)
    first, outcome = _in_background(download, rt, job_id)
    slow.append(first)
    assert held.wait(30)
    _lapse(engine, job_id)
    assert schedule_downloads(other) == [job_id]
    assert download(other, job_id) == "succeeded"
    release.set()
    first.join(30)
    assert outcome == ["lost-lease"]
    job = _job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.output_path is not None
    video = Path(job.output_path)
    assert video.is_file()  # the recorded output is still there, with its sidecar
    assert outputs.sidecar_path(video).is_file()
