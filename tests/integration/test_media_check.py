"""The download step's media check (issue #13), driven directly against a hostile fal.

What the simulator cannot send: a body that passes the download's container sniffing but is not
a decodable video. Also the two ``WANBATCH_MEDIA_MISMATCH`` modes on a render the request did
not ask for (the fake fal's clip is 64x64, 8 frames; the request is 480p, 81 frames).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
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
from worker import probe
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


def _disk_fails(*_args: object, **_kwargs: object) -> NoReturn:
    """``av.open`` as it fails when the disk cannot read the file: PyAV's OSError, EIO."""
    av.error.err_check(-errno.EIO, "r1.mp4")
    raise AssertionError("err_check raises for a negative code")


def _plain_read_fails(_path: object) -> OSError:
    """What a plain read of the saved file meets when its disk fails it."""
    return OSError(errno.EIO, "Input/output error")


@pytest.mark.parametrize(
    ("opened", "plain_read", "said", "not_said"),
    [
        (_out_of_files, None, ("EMFILE", "ulimit -n"), ()),
        (
            _disk_fails,
            _plain_read_fails,
            ("could not be checked (Input/output error)", "check that disk and its mount"),
            ("free space",),
        ),
    ],
    ids=["out of file descriptors", "the disk fails the read"],
)
def test_a_probe_that_fails_for_this_machine_keeps_the_paid_video_and_the_job(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    opened: Callable[..., NoReturn],
    plain_read: Callable[[object], OSError] | None,
    said: tuple[str, ...],
    not_said: tuple[str, ...],
) -> None:
    """EMFILE while probing, or an I/O error reading the saved video (the disk's, as a plain read
    of the file shows too), says nothing of what fal made: the video stays, the job waits (its
    batch paused with the cause's fix), and the next try stores that very file without fetching
    it. The I/O error was ``failed (not_a_video)``, the paid video deleted — found by injecting
    ``EACCES`` into a run's ``openat`` calls."""
    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(av, "open", opened)
            if plain_read is not None:
                patched.setattr(probe, "_unreadable", plain_read)
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
            for words in said:
                assert words in batch.pause_reason
            for words in not_said:
                assert words not in batch.pause_reason
            store.set_batch_state(session, job.batch_id, BatchState.ACTIVE)
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.output_path == str(kept[0])
    assert fal.file_gets("r1.mp4") == 1  # taken from the disk, not fetched again


def test_an_io_error_ffmpeg_alone_reports_is_the_files_own(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FFmpeg may word what it made of a damaged file with an errno too: when the file reads
    plainly to its end, the video is judged (``not_a_video``), not checked again for ever."""
    FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    try:
        with monkeypatch.context() as patched:
            patched.setattr(av, "open", _disk_fails)
            assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "not_a_video"
