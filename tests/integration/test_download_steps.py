"""The download step, driven directly against a hostile fal, on both databases.

What ``wanbatch run`` cannot easily show: a result call that fails past fal's retention, a
download whose lease is taken over mid-stream, an output folder that refuses writes.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import subprocess
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine

from jobs import db, outputs, store
from jobs.errors import NotFoundError
from jobs.models import BatchState, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider, drip, json_reply, raw_reply, wait_for
from tests.hostile_fal import COMPLETED, FakeFal
from tests.step_runtime import add_batch, make_runtime, settings_for, wait_until
from worker.steps import Runtime, dispatch, download, poll, schedule_downloads, submit

KEY = "download-steps-key-41c9"
GATEWAY_503 = raw_reply(b"<html>503 Service Temporarily Unavailable</html>", 503)


def completed_job(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, **overrides: Any
) -> tuple[Runtime, str]:
    """One job that fal (``FakeFal`` on ``hostile``) has completed: it is ``downloading`` now."""
    settings = settings_for(hostile.url, KEY, **{"output_dir": tmp_path / "outputs", **overrides})
    rt = make_runtime(engine, settings)
    add_batch(engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})])
    (job_id,) = dispatch(rt)
    assert submit(rt, job_id) == "submitted"
    wait_until(lambda: state_of(engine, job_id) == JobState.DOWNLOADING, step=lambda: poll(rt))
    return rt, job_id


def state_of(engine: Engine, job_id: str) -> JobState:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id).state


def make_due(engine: Engine, job_id: str) -> None:
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(session, job_id, expected_version=job.version, next_attempt_at=None)


def test_result_call_failures_are_retried_until_fals_retention_then_billed(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal = FakeFal(hostile)
    fal.on_result("r1", GATEWAY_503)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)
    try:
        # Within fal's retention: ask again, whatever the download-attempt budget says.
        for tries in (1, 2, 3):
            assert download(rt, job_id) == "result-retry"
            with db.session_scope(engine) as session:
                job = store.get_job(session, job_id)
            assert job.state == JobState.DOWNLOADING
            assert job.download_attempts == tries
            assert job.attempts == 1
            make_due(engine, job_id)
        # Past it (fal completed the request 61 minutes ago): fail, with fal's bill.
        with db.session_scope(engine) as session:
            job = store.get_job(session, job_id)
            store.update_job_fields(
                session, job_id, expected_version=job.version, completed_at=utcnow() - timedelta(minutes=61)
            )
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "result_unavailable"
    assert job.error is not None
    assert "fal no longer keeps the result" in job.error
    assert "503" in job.error
    assert job.actual_usd == job.est_usd  # fal made the video: it is paid for
    assert fal.posts() == 1


#: fal's answer to a result call once the result is gone (404, no error type).
EXPIRED = json_reply({"detail": "Result of request r1 has expired"}, 404)


@pytest.mark.parametrize(
    ("error_type", "outcome", "state", "billed"),
    [
        # a 5xx at fal: tried again, never billed
        ("runner_disconnected", "retry", JobState.RETRY_WAIT, False),
        # the model's, below 500, after 2.5 s of inference time: final, and billed (fal's FAQ:
        # a client-side error "may still be charged if a runner spent GPU time")
        ("content_policy_violation", "failed", JobState.FAILED, True),
    ],
)
def test_an_expired_result_of_a_request_fal_reported_failed_follows_fals_verdict(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    error_type: str,
    outcome: str,
    state: JobState,
    billed: bool,
) -> None:
    # The run was interrupted past fal's retention: the COMPLETED status said the request failed,
    # and by the time the result is asked for it has expired. The status's verdict decides.
    fal = FakeFal(hostile)
    fal.on_status("r1", json_reply({**COMPLETED, "error": "it failed at fal", "error_type": error_type}))
    fal.on_result("r1", EXPIRED)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    try:
        assert download(rt, job_id) == outcome
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == state
    assert job.error_type == error_type  # not result_expired
    assert job.error is not None
    assert "it failed at fal" in job.error
    assert job.actual_usd == (job.est_usd if billed else 0)
    assert fal.posts() == 1


#: fal's words for a request its safety checker stopped: the COMPLETED status's error, which the
#: result call replays as a 400 without an error type (an audit's loopback proxy saw exactly this).
FLAGGED = "Video generation not completed: output flagged by the safety checker"


def test_a_not_ready_result_of_a_request_fal_reported_failed_ends_with_fals_verdict(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    # "not completed" reads as "not ready", but the status already said COMPLETED with this very
    # error: the job was left downloading, its result asked for every 3 s for ever.
    fal = FakeFal(hostile)
    fal.on_status("r1", json_reply({**COMPLETED, "error": FLAGGED}))
    fal.on_result("r1", json_reply({"detail": FLAGGED}, 400))
    rt, job_id = completed_job(engine, hostile, tmp_path)
    try:
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == JobState.FAILED
    assert job.error is not None
    assert "safety checker" in job.error
    assert fal.result_calls("r1") == 1
    assert fal.posts() == 1  # a model's verdict: never sent again


def test_a_result_that_stays_not_ready_after_completion_fails_after_the_download_attempts(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal = FakeFal(hostile)
    fal.on_result("r1", json_reply({"detail": "Request is still in progress"}, 400))
    # A backoff of seconds (the fast settings' 0.05 s minimum was past by the assertion on a
    # loaded machine: CI)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=3, retry_base_delay=5.0)
    try:
        for tries in (1, 2):
            assert download(rt, job_id) == "not-ready"
            with db.session_scope(engine) as session:
                job = store.get_job(session, job_id)
            assert job.state == JobState.DOWNLOADING
            assert job.download_attempts == tries
            assert job.next_attempt_at is not None
            assert job.next_attempt_at > utcnow()
            make_due(engine, job_id)
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "result_unavailable"
    assert job.error is not None
    assert "still not ready" in job.error
    assert "3 tries" in job.error
    assert job.actual_usd == job.est_usd  # fal said COMPLETED without an error: a paid video
    assert fal.result_calls("r1") == 3
    assert fal.posts() == 1


def test_a_result_not_ready_past_fals_retention_fails_at_once(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal = FakeFal(hostile)
    fal.on_result("r1", json_reply({"detail": "Request is still in progress"}, 400))
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=5)
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, completed_at=utcnow() - timedelta(minutes=61)
        )
    try:
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "result_unavailable"
    assert job.error is not None
    assert "fal no longer keeps the result" in job.error


@pytest.mark.parametrize("metrics", [True, False], ids=["with-metrics", "without-metrics"])
def test_an_expired_result_of_a_request_fal_reported_successful_is_billed(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, metrics: bool
) -> None:
    fal = FakeFal(hostile)
    fal.on_result("r1", EXPIRED)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    if not metrics:  # as when the completion came by webhook: no inference time known
        with db.session_scope(engine) as session:
            job = store.get_job(session, job_id)
            store.update_job_fields(session, job_id, expected_version=job.version, provider_metrics=None)
    try:
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "result_expired"
    assert job.actual_usd == job.est_usd  # fal made the video and billed it
    assert fal.posts() == 1


def test_a_download_that_lost_its_lease_stops_and_leaves_nothing(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal = FakeFal(hostile)
    fal.on_file("r1.mp4", drip(fal.video, chunk=64, every=0.1))  # about 3 s
    rt, job_id = completed_job(engine, hostile, tmp_path, lease_seconds=1.5)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(download(rt, job_id)))
    try:
        worker.start()
        assert wait_for(lambda: fal.file_gets("r1.mp4") == 1)
        folder = tmp_path / "outputs" / "steps"
        assert wait_for(lambda: any(folder.glob(".*.part")))
        # A second task meanwhile finds the lease held (and renewed): it leaves the job alone.
        second = make_runtime(engine, rt.settings)
        try:
            assert wait_for(lambda: download(second, job_id) == "busy", timeout=3)
        finally:
            second.client.close()
        # Someone else takes the job over (as after a lapsed lease): the first download stops.
        with db.session_scope(engine) as session:
            job = store.get_job(session, job_id)
            assert job.lease_owner == rt.owner
            taken = store.take_lease(
                session, store.Fence.of(job, "other-worker"), now=utcnow(), lease_seconds=60
            )
            assert taken is not None
        worker.join(timeout=10)
        assert not worker.is_alive()
    finally:
        rt.client.close()
    assert outcome == ["lost-lease"]
    assert list(folder.iterdir()) == []  # its own temporary file went with it
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.state == JobState.DOWNLOADING
    assert job.lease_owner == "other-worker"
    assert fal.posts() == 1


@pytest.mark.parametrize("stalled", [False, True], ids=["streaming", "stalled"])
def test_a_run_that_stops_leaves_no_temporary_file_of_its_downloads(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, stalled: bool
) -> None:
    """A run that stops under control (the database's disk full, Ctrl-C) ends its process at once:
    before, a download under way left its `.…mp4.v5-….part` in the output folder for the next
    run to sweep. Now the download stops at its next chunk and removes it; one whose stream
    sends nothing more has it removed by the stop, after its grace."""
    fal = FakeFal(hostile)
    every = 30.0 if stalled else 0.05  # a stream that stalls after its first chunk, or one that flows
    fal.on_file("r1.mp4", drip(fal.video, chunk=64, every=every))
    rt, job_id = completed_job(engine, hostile, tmp_path)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(download(rt, job_id)), daemon=True)
    folder = tmp_path / "outputs" / "steps"
    try:
        worker.start()
        assert wait_for(lambda: folder.is_dir() and any(folder.glob(".*.part")))
        removed = rt.output_writes.stop(0.5)
        assert list(folder.iterdir()) == []  # nothing left, whichever removed it
        assert removed == (1 if stalled else 0)
        if not stalled:
            worker.join(timeout=10)
            assert outcome == ["lost-lease"]  # stopped: nothing recorded, the run gives it back
    finally:
        hostile.close()  # ends a stalled stream
        worker.join(timeout=10)
        rt.client.close()
    assert list(folder.iterdir()) == []
    with db.session_scope(engine) as session:
        assert store.get_job(session, job_id).state == JobState.DOWNLOADING  # its video waits at fal
    assert fal.posts() == 1


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a read-only tmpfs: refused even to root (``chmod`` is not, for root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"this test mounts a read-only tmpfs (needs root): {mounted.stderr.strip()}", pytrace=False
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_an_unwritable_output_folder_pauses_the_batch_and_keeps_the_paid_video(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, read_only_dir: Path
) -> None:
    """The video was made and billed and fal still has it: the job waits (not failed, no attempt
    counted), the batch stops sending, and resuming it downloads the video at once."""
    fal = FakeFal(hostile)
    settings = settings_for(hostile.url, KEY, output_dir=read_only_dir)
    rt = make_runtime(engine, settings)
    job = ("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})
    batch_id = add_batch(engine, "steps", [job, job])
    try:
        (job_id,) = dispatch(make_runtime(engine, settings_for(hostile.url, KEY, max_outstanding=1)))
        assert submit(rt, job_id) == "submitted"
        wait_until(lambda: state_of(engine, job_id) == JobState.DOWNLOADING, step=lambda: poll(rt))
        assert download(rt, job_id) == "outputs-paused"
        with db.session_scope(engine) as session:
            waiting = store.get_job(session, job_id)
            batch = store.get_batch(session, batch_id)
        assert (waiting.state, waiting.lease_owner, waiting.download_attempts, waiting.error) == (
            JobState.DOWNLOADING,
            None,
            0,
            None,
        )
        assert waiting.next_attempt_at is not None
        assert waiting.next_attempt_at > utcnow()  # not tried again at once: the disk is not fixed yet
        assert batch.state == BatchState.PAUSED
        assert batch.pause_reason is not None
        for words in ("outputs cannot be written here", "Read-only file system", str(read_only_dir)):
            assert words in batch.pause_reason
        assert dispatch(rt) == []  # nothing more is sent into the same folder
        assert fal.file_gets("r1.mp4") == 0  # nothing fetched that could not be kept

        with db.session_scope(engine) as session:  # the user runs the batch again, with room
            assert store.resume_batch(session, batch_id)
        writable = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "room"))
        assert schedule_downloads(writable) == [job_id]  # due at once, not in five minutes
        assert download(writable, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert fal.file_gets("r1.mp4") == 1
    assert fal.posts() == 1  # never made again


def test_a_batch_paused_for_its_outputs_resumes_once_one_is_stored_again(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, read_only_dir: Path
) -> None:
    """With workers nobody runs the batch again: the held job's next try, finding room, stores
    its video and ends the pause by itself; sending goes on. A pause for another reason stays."""
    fal = FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=read_only_dir))
    job = ("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})
    batch_id = add_batch(engine, "steps", [job, job])
    roomy = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "room"))
    try:
        (first,) = dispatch(make_runtime(engine, settings_for(hostile.url, KEY, max_outstanding=1)))
        assert submit(rt, first) == "submitted"
        wait_until(lambda: state_of(engine, first) == JobState.DOWNLOADING, step=lambda: poll(rt))
        assert download(rt, first) == "outputs-paused"
        assert dispatch(roomy) == []  # paused: nothing is sent

        with db.session_scope(engine) as session:  # the retry falls due (WANBATCH_RETRY_MAX_DELAY)
            store.update_job_fields(
                session,
                first,
                expected_version=store.get_job(session, first).version,
                next_attempt_at=utcnow() - timedelta(seconds=1),
            )
        assert schedule_downloads(roomy) == [first]
        assert download(roomy, first) == "succeeded"  # there is room now
        with db.session_scope(engine) as session:
            batch = store.get_batch(session, batch_id)
        assert (batch.state, batch.pause_reason) == (BatchState.ACTIVE, None)
        assert len(dispatch(roomy)) == 1  # the second job goes out

        # A pause that is not about outputs is not ended by a stored output.
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.PAUSED, reason="fal refused the account")
            assert not store.resume_after_outputs_stored(session, batch_id)
            assert store.get_batch(session, batch_id).state == BatchState.PAUSED
    finally:
        rt.client.close()
        roomy.client.close()
    assert fal.posts() == 1  # the paused job was never made again
    assert fal.file_gets("r1.mp4") == 1


def test_an_unwritable_output_folder_fails_the_job_of_a_cancelled_batch(
    engine: Engine, hostile: HostileProvider, read_only_dir: Path
) -> None:
    """A cancelled batch has no next run for the job to wait for (`cancel` would wait for ever)."""
    fal = FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=read_only_dir))
    batch_id = add_batch(
        engine, "steps", [("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})]
    )
    try:
        (job_id,) = dispatch(rt)
        assert submit(rt, job_id) == "submitted"
        wait_until(lambda: state_of(engine, job_id) == JobState.DOWNLOADING, step=lambda: poll(rt))
        with db.session_scope(engine) as session:
            store.set_batch_state(session, batch_id, BatchState.CANCELLED, "cancelled by user")
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert store.get_batch(session, batch_id).state == BatchState.CANCELLED
    assert (job.state, job.error_type) == (JobState.FAILED, "output_not_kept")
    assert job.error is not None
    assert "Read-only file system" in job.error
    # Not the pause's "wait at fal … downloaded by the next run, never made again": a cancelled
    # batch has no next run (`run` refuses it), and nothing downloads the video any more.
    assert job.error.startswith("the batch was cancelled while its outputs could not be stored: ")
    assert "this paid video was not kept and nothing downloads it now" in job.error
    assert "never made again" not in job.error
    assert "next run" not in job.error
    assert job.actual_usd == job.est_usd  # fal made it: paid for
    assert fal.posts() == 1


def test_an_output_is_on_disk_for_good_before_its_success_is_recorded(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renames are durable only once their folder is synced (POSIX). The video's and its
    sidecar's renames both come before one sync of the output folder, and that before the
    success is recorded: a power loss never leaves a succeeded job whose sidecar is gone."""
    import os

    FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    folder = (tmp_path / "outputs" / "steps").resolve()
    seen: list[tuple[str, str]] = []
    real_fsync, real_replace, real_succeeded = os.fsync, os.replace, store.mark_succeeded
    real_link = os.link

    def fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        seen.append(("rename", Path(dst).name))
        real_replace(src, dst)

    def link(src: Any, dst: Any) -> None:  # the video takes its name by a link (never over a file)
        seen.append(("rename", Path(dst).name))
        real_link(src, dst)

    def succeeded(*args: Any, **kwargs: Any) -> Any:
        seen.append(("succeeded", job_id))
        return real_succeeded(*args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(store, "mark_succeeded", succeeded)
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    steps = [(what, Path(arg).name if what == "fsync" and Path(arg) != folder else arg) for what, arg in seen]
    renames = [i for i, (what, _) in enumerate(steps) if what == "rename"]
    assert [steps[i][1].rsplit(".", 1)[1] for i in renames] == ["mp4", "json"]
    folder_syncs = [i for i, step in enumerate(steps) if step == ("fsync", str(folder))]
    assert len(folder_syncs) == 1  # one sync makes both renames durable
    assert renames[-1] < folder_syncs[0] < steps.index(("succeeded", job_id))


def test_a_download_reads_its_video_back_once_and_its_folder_path_without_walking_it(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file-system calls of one stored video (issue #11's CPU line): the video and its
    sidecar are made with the user's mode as they are created (no umask read from /proc, no
    ``fchmod``); the MP4's boxes are walked once, on the download's open file, not again by the
    probe through a new ``open``; the output folder is resolved once and the batch folder found
    by one ``lstat``, not resolved again for the placement. What is stored is unchanged."""
    import os
    import stat

    from jobs import fs

    FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    (tmp_path / "outputs" / "steps").mkdir(parents=True)  # there, as for every video but a batch's first
    mask = fs.umask()
    opened: list[str] = []
    resolved: list[str] = []
    real_open, real_resolve = os.open, Path.resolve

    def recording_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        opened.append(Path(os.fsdecode(path)).name)
        return real_open(path, flags, *args, **kwargs)

    def recording_resolve(self: Path, strict: bool = False) -> Path:
        resolved.append(self.name)
        return real_resolve(self, strict)

    def no_umask() -> int:
        raise AssertionError("the umask was read for a file the kernel can give the mode to")

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(Path, "resolve", recording_resolve)
    monkeypatch.setattr(fs, "umask", no_umask)
    monkeypatch.setattr(os, "fchmod", lambda *_: (_ for _ in ()).throw(AssertionError("fchmod")))
    try:
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    monkeypatch.undo()
    (video,) = (tmp_path / "outputs" / "steps").glob("*.mp4")
    sidecar = video.with_suffix(".json")
    # no open of the video under its name: the shared lock held while it is stored is taken on
    # the download's own descriptor (a dup), before the file takes the name
    assert opened.count(video.name) == 0
    assert len([name for name in opened if name.endswith(".part")]) == 1
    assert resolved == ["outputs"]  # the output folder, once; the batch folder by one lstat
    for path in (video, sidecar):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
    assert job.output_path == str(video)
    assert job.media is not None
    assert job.media["width"] > 0
    assert json.loads(sidecar.read_text())["video_path"] == f"steps/{video.name}"


def _resume_and_download(engine: Engine, batch_id: str, rt: Runtime, job_id: str) -> None:
    """The user fixed the folder and runs the batch again: the waiting video is downloaded now."""
    with db.session_scope(engine) as session:
        assert store.resume_batch(session, batch_id)
    assert schedule_downloads(rt) == [job_id]
    assert download(rt, job_id) == "succeeded"


def _paused_waiting(engine: Engine, batch_id: str, job_id: str) -> str:
    """The batch's pause reason, checking the job waits (downloading, no lease, not failed)."""
    with db.session_scope(engine) as session:
        waiting = store.get_job(session, job_id)
        batch = store.get_batch(session, batch_id)
    assert (waiting.state, waiting.lease_owner, waiting.error) == (JobState.DOWNLOADING, None, None)
    assert batch.state == BatchState.PAUSED
    assert batch.pause_reason is not None
    return batch.pause_reason


def test_a_batch_folder_linked_out_of_the_output_folder_pauses_the_batch(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """A batch folder that is a link out of WANBATCH_OUTPUT_DIR (moved to a bigger disk) is an
    output folder that cannot be written: the batch pauses with why — it was a bug report and a
    job taken again for ever (the run hung). Once the link is a real folder, the next run
    downloads the paid video, never making it again."""
    fal = FakeFal(hostile)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "steps").symlink_to(elsewhere)
    rt, job_id = completed_job(engine, hostile, tmp_path, output_dir=out)
    with db.session_scope(engine) as session:
        batch_id = store.get_job(session, job_id).batch_id
    try:
        assert download(rt, job_id) == "outputs-paused"
        reason = _paused_waiting(engine, batch_id, job_id)
        assert reason.startswith("outputs cannot be written here: the batch folder ")
        assert f"resolves to {elsewhere.resolve()}, outside WANBATCH_OUTPUT_DIR {out.resolve()}" in reason
        assert fal.file_gets("r1.mp4") == 0
        (out / "steps").unlink()
        (out / "steps").mkdir()
        _resume_and_download(engine, batch_id, rt, job_id)
    finally:
        rt.client.close()
    assert list(elsewhere.iterdir()) == []
    assert fal.posts() == 1  # never made again


def test_a_removed_working_folder_pauses_the_batch(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default relative ``./outputs`` whose working folder was removed mid-run: the batch
    pauses with why (it was ``FileNotFoundError`` from ``getcwd``, reported as a bug, for ever)."""
    fal = FakeFal(hostile)
    gone = tmp_path / "work"
    gone.mkdir()
    monkeypatch.chdir(gone)
    rt, job_id = completed_job(engine, hostile, tmp_path, output_dir=Path("outputs"))
    with db.session_scope(engine) as session:
        batch_id = store.get_job(session, job_id).batch_id
    try:
        gone.rmdir()
        assert download(rt, job_id) == "outputs-paused"
        reason = _paused_waiting(engine, batch_id, job_id)
        assert "the working folder that WANBATCH_OUTPUT_DIR outputs is relative to is gone" in reason
        monkeypatch.chdir(tmp_path)  # the user runs again from a folder that exists
        _resume_and_download(engine, batch_id, rt, job_id)
    finally:
        rt.client.close()
    assert [p.suffix for p in sorted((tmp_path / "outputs" / "steps").iterdir())] == [".json", ".mp4"]
    assert fal.posts() == 1


def test_a_download_that_keeps_crashing_pauses_its_batch_and_keeps_the_paid_video(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the download step must not hang a run either: the job is given back at once, and
    at the CRASH_LIMIT-th crash its batch is paused, naming the crash file (``run`` ends, exit 2,
    ``status`` says why). The job is not failed: the next run (the bug fixed) downloads the paid
    video without sending anything again."""
    from worker import embedded
    from worker import steps as all_steps

    download_step = importlib.import_module("worker.steps.download")  # the module, not the step

    fal = FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    with db.session_scope(engine) as session:
        batch_id = store.get_job(session, job_id).batch_id

    def bug(*_args: Any, **_kwargs: Any) -> str:
        raise KeyError("a genuine bug")

    monkeypatch.setattr(download_step, "_fetch_video", bug)
    worker = embedded.InProcessWorker(1)
    worker.bind(rt)
    try:
        for crash in (1, 2, 3):  # CRASH_LIMIT
            worker._run(all_steps.download, job_id)  # as a download thread runs it
            with db.session_scope(engine) as session:
                job = store.get_job(session, job_id)
                batch = store.get_batch(session, batch_id)
            assert (job.state, job.lease_owner) == (JobState.DOWNLOADING, None)  # given back
            last = crash == 3
            assert batch.state == (BatchState.PAUSED if last else BatchState.ACTIVE)
        reason = _paused_waiting(engine, batch_id, job_id)
        assert reason.startswith(f"the download of job {job_id} crashed 3 times: KeyError: 'a genuine bug'")
        assert "please report it (details in " in reason
        assert "wanbatch-crash-" in reason
        assert not reason.startswith(store.OUTPUTS_PAUSE_PREFIX)  # another job's success does not end it
        monkeypatch.undo()
        _resume_and_download(engine, batch_id, rt, job_id)
    finally:
        worker.close()
        rt.client.close()
    assert fal.posts() == 1


def test_a_distributed_download_whose_bug_is_a_missing_row_is_given_back_too(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's task whose step raised ``NotFoundError`` for a job its database holds (a bug:
    something else was missing) re-raised it with the lease kept, so the job was taken again at
    every lease's end, for ever; it now goes through the same crash bound as any other bug."""
    from worker import steps as all_steps
    from worker import tasks

    download_step = importlib.import_module("worker.steps.download")
    FakeFal(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)

    def bug(*_args: Any, **_kwargs: Any) -> str:
        raise NotFoundError("no job 'a-missing-row': a genuine bug")

    monkeypatch.setattr(download_step, "_fetch_video", bug)
    monkeypatch.setattr(tasks, "runtime", lambda _app: rt)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the crash report goes there
    monkeypatch.setattr("tempfile.tempdir", None)

    class Task:
        app = None

    try:
        with pytest.raises(NotFoundError):
            tasks._run(cast(Any, Task()), job_id, all_steps.download)
        with db.session_scope(engine) as session:
            job = store.get_job(session, job_id)
        assert (job.state, job.lease_owner) == (JobState.DOWNLOADING, None)  # given back at once
    finally:
        rt.client.close()


def test_a_full_disk_under_a_batch_paused_already_is_warned_once_for_the_batch(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch paused for another reason (``wanbatch pause``, a budget) whose outputs cannot be
    written (a full disk) is not paused again, and its jobs' tries said so at INFO only: the
    operator who resumed it later learnt of the full disk only when jobs failed again. Now the
    storage trouble is said once at WARNING for the batch (not once per job, not per try), and
    the batch's own pause reason is left as it was."""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    job = ("fal-ai/wan-22", {"prompt": "a paper boat", "resolution": "480p"})
    batch_id = add_batch(
        engine, "steps", [job, ("fal-ai/wan-22", {"prompt": "a red kite", "resolution": "480p"})]
    )
    try:
        job_ids = dispatch(rt)
        assert len(job_ids) == 2
        for job_id in job_ids:
            assert submit(rt, job_id) == "submitted"
        wait_until(
            lambda: all(state_of(engine, j) == JobState.DOWNLOADING for j in job_ids), step=lambda: poll(rt)
        )
        with db.session_scope(engine) as session:  # wanbatch pause
            store.set_batch_state(session, batch_id, BatchState.PAUSED)

        def full(*_args: Any, **_kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(outputs, "write_json_atomic", full)
        caplog.set_level(logging.DEBUG, logger="worker.steps.download")
        for _round in range(2):
            for job_id in job_ids:
                assert download(rt, job_id) == "outputs-paused"
                make_due(engine, job_id)
    finally:
        rt.client.close()
    said = [r for r in caplog.records if str(getattr(r, "event", "")).startswith("download.outputs_")]
    assert [r.levelno for r in said] == [logging.WARNING] + [logging.INFO] * 3
    warning = " ".join(said[0].getMessage().split())
    assert warning.startswith(f"job {job_ids[0]}: its output cannot be stored now; batch paused already")
    assert "No space left on device" in warning
    assert "free space or fix WANBATCH_OUTPUT_DIR" in warning
    with db.session_scope(engine) as session:
        batch = store.get_batch(session, batch_id)
    assert (batch.state, batch.pause_reason) == (BatchState.PAUSED, None)  # still the user's pause


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # SQLite writes one at a time
def test_a_full_disk_met_by_two_downloads_at_once_is_warned_once_for_the_batch(
    engine: Engine,
    hostile: HostileProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full disk fails every download under way at once, each on a thread of the download pool:
    each read "not said yet" for the batch, paused already for another reason, before either had
    said it, and each warned. The batch is claimed for its one warning in one step now."""
    FakeFal(hostile)
    rt = make_runtime(engine, settings_for(hostile.url, KEY, output_dir=tmp_path / "outputs"))
    jobs = [("fal-ai/wan-22", {"prompt": p, "resolution": "480p"}) for p in ("a paper boat", "a red kite")]
    batch_id = add_batch(engine, "steps", jobs)
    try:
        job_ids = dispatch(rt)
        assert len(job_ids) == 2
        for job_id in job_ids:
            assert submit(rt, job_id) == "submitted"
        wait_until(
            lambda: all(state_of(engine, j) == JobState.DOWNLOADING for j in job_ids), step=lambda: poll(rt)
        )
        with db.session_scope(engine) as session:  # wanbatch pause
            store.set_batch_state(session, batch_id, BatchState.PAUSED)

        def full(*_args: Any, **_kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(outputs, "write_json_atomic", full)
        both_decided = threading.Barrier(2, timeout=30.0)
        release_lease = store.release_lease

        def release_together(*args: Any, **kwargs: Any) -> Any:
            both_decided.wait()  # each has read its batch, and decided, before either goes on
            return release_lease(*args, **kwargs)

        monkeypatch.setattr(store, "release_lease", release_together)
        caplog.set_level(logging.DEBUG, logger="worker.steps.download")
        outcomes: list[str] = []
        threads = [threading.Thread(target=lambda j=j: outcomes.append(download(rt, j))) for j in job_ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60.0)
    finally:
        rt.client.close()
    assert outcomes == ["outputs-paused", "outputs-paused"]
    said = [r for r in caplog.records if str(getattr(r, "event", "")).startswith("download.outputs_")]
    assert sorted(r.levelno for r in said) == [logging.INFO, logging.WARNING]
