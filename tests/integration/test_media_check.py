"""The download step's media check (issue #13), driven directly against a hostile fal.

What the simulator cannot send: a body that passes the download's container sniffing but is not
a decodable video. Also the two ``WANBATCH_MEDIA_MISMATCH`` modes on a render the request did
not ask for (the fake fal's clip is 64x64, 8 frames; the request is 480p, 81 frames).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import NoReturn

import av
import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.models import BatchState, Job
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.integration.test_download_steps import completed_job
from worker.steps import download

#: The start of an MP4 (an ``ftyp`` box) and then noise: it looks like a video, it is not one.
NOT_A_VIDEO = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(range(256)) * 40


def _job(engine: Engine, job_id: str) -> Job:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def test_a_body_that_is_not_a_decodable_video_never_succeeds(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal = FakeFal(hostile, video=NOT_A_VIDEO)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    try:
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "not_a_video"
    assert job.error is not None
    assert "not a decodable video" in job.error
    assert job.actual_usd == job.est_usd  # fal made it: billed
    assert job.output_path is None
    assert not list((tmp_path / "outputs").rglob("*.mp4"))  # nothing kept that does not count
    assert fal.file_gets("r1.mp4") == 1  # a final verdict: not fetched again


def test_a_mismatch_is_recorded_with_the_success_by_default(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    media = {"width": 64, "height": 64, "frames": 8, "fps": 8.0, "duration_s": 1.0}
    assert job.media is not None
    assert {k: job.media[k] for k in media} == media  # the codec: h264, or mpeg4 without libx264
    assert job.media_mismatch is not None
    assert "short side 64, expected 480" in job.media_mismatch
    assert "8 frames, expected 81" in job.media_mismatch
    assert job.output_path is not None
    assert Path(job.output_path).exists()


def test_with_media_mismatch_fail_the_job_fails_with_the_reason_and_its_cost(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path, media_mismatch="fail")
    try:
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "media_mismatch"
    assert job.error is not None
    assert "8 frames, expected 81" in job.error
    assert job.media_mismatch is not None
    assert job.media is not None
    assert job.media["width"] == 64
    assert job.actual_usd == job.est_usd
    with db.session_scope(engine) as session:
        assert store.count_media_mismatches(session, job.batch_id) == 1


def _out_of_files(*_args: object, **_kwargs: object) -> NoReturn:
    """``av.open`` as it fails in a process out of file descriptors: PyAV's OSError, EMFILE."""
    av.error.err_check(-errno.EMFILE, "r1.mp4")
    raise AssertionError("err_check raises for a negative code")


def test_a_probe_out_of_file_descriptors_keeps_the_paid_video_and_the_job(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE while probing is this machine's trouble, not fal's: the video stays, the job waits
    (its batch paused with the fix), and the next try stores that very file without fetching it."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(av, "open", _out_of_files)
            outcome = download(rt, job_id)
        job = _job(engine, job_id)
        assert outcome != "failed"
        assert job.state == JobState.DOWNLOADING
        assert job.error_type is None
        kept = list((tmp_path / "outputs").rglob("*.mp4"))
        assert len(kept) == 1  # the paid video is not deleted
        with db.session_scope(engine) as session:
            batch = store.get_batch(session, job.batch_id)
            assert batch.state == BatchState.PAUSED
            assert batch.pause_reason is not None
            assert "EMFILE" in batch.pause_reason
            assert "ulimit -n" in batch.pause_reason
            store.set_batch_state(session, job.batch_id, BatchState.ACTIVE)
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.output_path == str(kept[0])
    assert fal.file_gets("r1.mp4") == 1  # taken from the disk, not fetched again
