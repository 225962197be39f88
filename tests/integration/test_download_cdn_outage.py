"""A short outage of fal's media host (the CDN answers 5xx/429, or drops the body midway) must
not throw away a paid video, nor lead to paying for it again.

The audit: with the simulator's ``download_error`` (503) at p=0.99, 8 of 12 paid jobs ended
``failed``/``download_failed`` after ``WANBATCH_DOWNLOAD_ATTEMPTS`` tries within about 75 s,
while fal still served each result; ``rerun --failed-only`` then rendered (and billed) them
again. Such failures now keep the job ``downloading`` (uncounted, backoff up to
``WANBATCH_RETRY_MAX_DELAY``), pause the batch after a minute with the host and the status,
and the pause ends by itself with the first video stored again.
"""

from __future__ import annotations

import itertools
import json
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from jobs import db, store
from jobs.models import BatchState, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider, Recorded, json_reply, raw_reply
from tests.hostile_fal import FakeFal
from tests.integration.test_download_steps import GATEWAY_503, completed_job, make_due
from worker.steps import download
from worker.steps.download_reach import WARN_EVERY_SECONDS, DownloadReach, DownloadTrouble

MP4 = {"Content-Type": "video/mp4"}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _job(engine: Engine, job_id: str) -> Any:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def _due(engine: Engine, job_id: str) -> None:
    """Make the waiting job due now, as time passing does (its retry time stays set: what tells
    a retried download, whose success may end its batch's pause)."""
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, next_attempt_at=utcnow() - timedelta(seconds=1)
        )


def _batch(engine: Engine, batch_id: str) -> Any:
    with db.session_scope(engine) as session:
        return store.get_batch(session, batch_id)


def test_a_cdn_answering_503_keeps_the_paid_job_pauses_the_batch_and_resumes_by_itself(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal = FakeFal(hostile)
    fal.on_file("r1.mp4", GATEWAY_503)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)
    clock = _Clock()
    rt.download_trouble = DownloadTrouble(clock)
    batch_id = _job(engine, job_id).batch_id
    try:
        # Far more tries than WANBATCH_DOWNLOAD_ATTEMPTS (2): the job waits, nothing counted.
        for _ in range(5):
            assert download(rt, job_id) == "download-held"
            job = _job(engine, job_id)
            assert (job.state, job.download_attempts, job.error) == (JobState.DOWNLOADING, 0, None)
            assert job.next_attempt_at is not None
            assert _batch(engine, batch_id).state == BatchState.ACTIVE  # not a minute yet
            clock.now += 5
            _due(engine, job_id)
        # A minute of failing downloads: the batch is paused, naming the host and the status.
        clock.now += 60
        assert download(rt, job_id) == "outputs-paused"
        batch = _batch(engine, batch_id)
        assert batch.state == BatchState.PAUSED
        reason = batch.pause_reason or ""
        assert reason.startswith("outputs cannot be downloaded here")
        assert "127.0.0.1" in reason
        assert "HTTP 503" in reason
        assert "never made again" in reason
        job = _job(engine, job_id)
        assert (job.state, job.download_attempts) == (JobState.DOWNLOADING, 0)
        # The CDN serves it again: the video is stored and the pause ends by itself.
        fal.on_file("r1.mp4", raw_reply(fal.video, headers=MP4))
        _due(engine, job_id)
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert _batch(engine, batch_id).state == BatchState.ACTIVE
    job = _job(engine, job_id)
    assert job.state == JobState.SUCCEEDED
    assert job.actual_usd == job.est_usd  # billed once
    assert fal.file_gets("r1.mp4") == 7
    assert fal.posts() == 1  # never made again


def _cut_mid_body(video: bytes) -> Any:
    """Announce the whole video, send half of it, then close: a connection lost mid-body."""

    def behave(_req: Recorded, sock: socket.socket) -> None:
        head = (
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: video/mp4\r\n"
            f"Content-Length: {len(video)}\r\n\r\n"
        )
        sock.sendall(head.encode() + video[: len(video) // 2])
        sock.close()

    return behave


def test_a_body_lost_midway_is_waited_for_not_counted(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    fal = FakeFal(hostile)
    fal.on_file("r1.mp4", _cut_mid_body(fal.video))
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=1)
    try:
        assert download(rt, job_id) == "download-held"
        assert download(rt, job_id) in ("download-held", "skipped")  # not due yet: still waiting
        job = _job(engine, job_id)
        assert (job.state, job.download_attempts) == (JobState.DOWNLOADING, 0)
        fal.on_file("r1.mp4", raw_reply(fal.video, headers=MP4))
        make_due(engine, job_id)
        assert download(rt, job_id) == "succeeded"
    finally:
        rt.client.close()
    assert fal.posts() == 1


def test_a_cdn_failing_long_past_fals_media_lifetime_ends_the_job_with_its_cost(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The horizon: fal completed the request more than 7 days ago (its default media
    lifetime) and the host still fails WANBATCH_DOWNLOAD_ATTEMPTS tries in a row."""
    fal = FakeFal(hostile)
    fal.on_file("r1.mp4", GATEWAY_503)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=3)
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, completed_at=utcnow() - timedelta(days=8)
        )
    try:
        outcomes = []
        for _ in range(3):
            outcomes.append(download(rt, job_id))
            make_due(engine, job_id)
    finally:
        rt.client.close()
    assert outcomes == ["download-held", "download-held", "failed"]
    job = _job(engine, job_id)
    assert job.state == JobState.FAILED
    assert job.error_type == "download_failed"
    assert "HTTP 503" in (job.error or "")
    assert "7 days" in (job.error or "")
    assert job.actual_usd == job.est_usd
    assert fal.posts() == 1


def test_a_video_cut_short_by_a_whole_answer_still_counts_as_a_try(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """Not the CDN's outage: a 200 whose body is shorter than fal's ``file_size`` is a bad
    answer, bounded by WANBATCH_DOWNLOAD_ATTEMPTS as before."""
    fal = FakeFal(hostile)
    fal.on_file("r1.mp4", raw_reply(fal.video[: len(fal.video) // 2], headers=MP4))
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)
    try:
        assert download(rt, job_id) == "download-retry"
        make_due(engine, job_id)
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    assert _job(engine, job_id).error_type == "download_failed"


def test_one_file_the_host_fails_while_it_serves_others_counts_its_tries(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """Not an outage: the host stores other videos while it answers this one's file with 503
    every time. Held without a count, the job (and a run waiting on it) stayed ``downloading``
    for fal's whole media lifetime; its failures count once the host served others since."""
    fal = FakeFal(hostile)
    fal.on_file("r1.mp4", GATEWAY_503)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)
    try:
        assert download(rt, job_id) == "download-held"  # maybe an outage: nothing to tell yet
        make_due(engine, job_id)
        rt.download_trouble.succeeded("another-job")  # the host stores another video whole
        assert download(rt, job_id) == "download-retry"  # this file's trouble: a try
        make_due(engine, job_id)
        rt.download_trouble.succeeded("another-job")
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert (job.state, job.error_type) == (JobState.FAILED, "download_failed")
    assert "HTTP 503" in (job.error or "")
    assert job.actual_usd == job.est_usd
    assert fal.posts() == 1


def test_a_503_an_hour_after_a_job_that_left_does_not_pause_at_once(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """One job met a 503, then left without a video stored (its file answered 404 or 410, a
    short body, its lease lost): the outage stayed open, so an hour later the first 503 of
    another job had "lasted" an hour and paused its batch at once (and `run` exited 2)."""
    fal = FakeFal(hostile)
    fal.on_file("r1.mp4", GATEWAY_503)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=5)
    clock = _Clock()
    rt.download_trouble = DownloadTrouble(clock)
    rt.download_trouble.failed("other-job", "v3.fal.media", "answers HTTP 503")
    rt.download_trouble.forget("other-job")  # _download_failed's path: it left without a video
    assert rt.download_trouble.note() is None
    clock.now += 3600  # an hour later, no trouble meanwhile
    try:
        assert download(rt, job_id) == "download-held"  # this job's first 503
        clock.now += 30
        _due(engine, job_id)
        assert download(rt, job_id) == "download-held"
    finally:
        rt.client.close()
    assert _batch(engine, _job(engine, job_id).batch_id).state == BatchState.ACTIVE


def _cancel(rt: Any, engine: Engine, batch_id: str) -> Any:
    """``wanbatch cancel``'s own operation on this database."""
    from jobs import batches

    url = engine.url.render_as_string(hide_password=False)
    return batches.cancel_batch(batch_id, rt.settings.model_copy(update={"database_url": url}), by="test")


def test_cancel_of_a_batch_a_cdn_outage_paused_ends_within_ten_minutes_not_its_tries(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """Before, `cancel` said each waiting video was "stored if there is room, else
    output_not_kept" (words for a full disk), while the cancelled batch's download just waited,
    uncounted, for as long as the CDN failed — and `cancel` processes the batch until it is over:
    days. Now it says what waits (fal's media host), and the job is held 10 minutes at most
    since its first failure: then it fails `download_failed`, its cost recorded. Not by its tries
    (WANBATCH_DOWNLOAD_ATTEMPTS): a ~75 s CDN blip failed every paid video of a cancelled batch."""
    from jobs import batches

    fal = FakeFal(hostile)
    fal.on_file("r1.mp4", GATEWAY_503)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)
    clock = _Clock()
    rt.download_trouble = DownloadTrouble(clock)
    batch_id = _job(engine, job_id).batch_id
    try:
        assert download(rt, job_id) == "download-held"
        clock.now += 61
        _due(engine, job_id)
        assert download(rt, job_id) == "outputs-paused"
        with db.session_scope(engine) as session:  # its backoff, as in production
            job = store.get_job(session, job_id)
            store.update_job_fields(
                session,
                job_id,
                expected_version=job.version,
                next_attempt_at=utcnow() + timedelta(seconds=300),
            )
        done = _cancel(rt, engine, batch_id)
        assert (done.outputs_waiting, done.downloads_waiting) == (0, 1)
        line = batches.outputs_waiting_line(done) or ""
        assert line.startswith(
            "cancel: 1 paid video(s) waited for fal's media host (outputs cannot be downloaded here: "
        ), line
        assert "HTTP 503" in line
        assert "room" not in line
        assert "output_not_kept" not in line
        assert "download_failed" in line
        assert "after 10 minutes of failing" in line
        assert _job(engine, job_id).next_attempt_at is None  # tried now, not in 5 minutes
        outcomes = []
        for _ in range(4):  # far more than its 2 tries, within 10 minutes of its first failure
            outcomes.append(download(rt, job_id))
            clock.now += 120
            make_due(engine, job_id)
        assert _job(engine, job_id).state == JobState.DOWNLOADING
        clock.now += 60  # 61 + 4*120 + 60 = 601 s since its first failure
        outcomes.append(download(rt, job_id))
    finally:
        rt.client.close()
    assert outcomes == ["download-held"] * 4 + ["failed"]
    job = _job(engine, job_id)
    assert (job.state, job.error_type, job.download_attempts) == (JobState.FAILED, "download_failed", 0)
    assert "HTTP 503" in (job.error or "")
    assert "after its batch was cancelled" in (job.error or "")
    assert job.actual_usd == job.est_usd  # paid: its cost recorded
    assert fal.posts() == 1
    assert rt.download_trouble.note() is None  # it no longer waits on the host


def test_a_cancelled_batchs_download_that_cannot_connect_is_held_ten_minutes(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The cannot-connect hold had the same gap: a cancelled batch's download waited, uncounted,
    for as long as the CDN could not be reached. It is held 10 minutes since its first failure,
    not by its tries (which a blip of a minute spent)."""
    fal = FakeFal(hostile)
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    gone = f"http://127.0.0.1:{port}/files/r1.mp4"
    fal.on_result("r1", json_reply(fal.result_for("r1", url=gone)))
    allowed = ["127.0.0.1"]  # a loopback video URL: refused unless listed
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2, download_allowed_hosts=allowed)
    clock = _Clock()
    rt.download_reach = DownloadReach(clock)
    batch_id = _job(engine, job_id).batch_id
    try:
        assert download(rt, job_id) == "download-held"  # active: held, uncounted
        assert _job(engine, job_id).download_attempts == 0
        _cancel(rt, engine, batch_id)
        outcomes = []
        for _ in range(4):  # twice its tries, within 10 minutes of its first failure
            clock.now += 140
            make_due(engine, job_id)
            outcomes.append(download(rt, job_id))
        assert _job(engine, job_id).state == JobState.DOWNLOADING
        clock.now += 41  # 601 s since its first failure
        make_due(engine, job_id)
        outcomes.append(download(rt, job_id))
    finally:
        rt.client.close()
    assert outcomes == ["download-held"] * 4 + ["failed"]
    job = _job(engine, job_id)
    assert (job.state, job.error_type, job.download_attempts) == (JobState.FAILED, "download_failed", 0)
    assert job.actual_usd == job.est_usd


def test_a_job_that_left_without_being_forgotten_leaves_no_outage_behind(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """Review repro: a job met a 503 while another process took its lease over, so its hold's
    release was refused ("lost-lease") and nothing forgot it. The outage stayed open ("downloads
    wait" for ever) and, an hour later, the FIRST 503 of another batch's job paused that batch
    at once. Every way out of the download step now forgets the job."""
    from tests.step_runtime import add_batch, wait_until
    from worker.steps import dispatch, poll, submit

    fal = FakeFal(hostile)
    box: dict[str, str] = {}

    def taken_over_then_503(req: Recorded, sock: Any) -> None:
        # another process takes the job over (its lease lapsed) while this GET is under way
        with db.session_scope(engine) as session:
            job = store.get_job(session, box["a"])
            other = store.Fence.of(job, "other-worker")
            assert store.take_lease(session, other, now=utcnow(), lease_seconds=60)
        GATEWAY_503(req, sock)

    fal.on_file("r1.mp4", taken_over_then_503)
    fal.on_file("r2.mp4", GATEWAY_503)
    rt, a = completed_job(engine, hostile, tmp_path, download_attempts=5)
    box["a"] = a
    clock = _Clock()
    rt.download_trouble = DownloadTrouble(clock)
    try:
        assert download(rt, a) == "lost-lease"  # job A is now another process's
        assert rt.download_trouble.note() is None  # no job waits on the host here
        clock.now += 3600  # an hour, no download trouble meanwhile
        add_batch(engine, "later", [("fal-ai/wan-22", {"prompt": "a kite", "resolution": "480p"})])
        (b,) = dispatch(rt)
        assert submit(rt, b) == "submitted"
        wait_until(lambda: _job(engine, b).state == JobState.DOWNLOADING, step=lambda: poll(rt))
        outcome = download(rt, b)  # job B's very first 503
    finally:
        rt.client.close()
    assert outcome == "download-held"
    assert _batch(engine, _job(engine, b).batch_id).state == BatchState.ACTIVE


def _closed_port() -> int:
    with socket.socket() as closed:  # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        return int(closed.getsockname()[1])


def test_a_batch_paused_for_downloads_that_cannot_connect_shows_the_latest_reason(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The batch kept the reason it was paused with (``status`` shows it) while its downloads
    went on failing for another: the latest one is shown."""
    fal = FakeFal(hostile)
    first, then = _closed_port(), _closed_port()
    fal.on_result("r1", json_reply(fal.result_for("r1", url=f"http://127.0.0.1:{first}/files/r1.mp4")))
    allowed = ["127.0.0.1"]
    rt, job_id = completed_job(engine, hostile, tmp_path, download_allowed_hosts=allowed)
    clock = _Clock()
    rt.download_reach = DownloadReach(clock)
    batch_id = _job(engine, job_id).batch_id
    try:
        assert download(rt, job_id) == "download-held"
        clock.now += 61
        make_due(engine, job_id)
        assert download(rt, job_id) == "outputs-paused"
        reason = _batch(engine, batch_id).pause_reason or ""
        assert f"127.0.0.1:{first}" in reason
        # Its downloads now fail for another reason (its video's URL, as fal's result stored
        # with the job gives it, names another host): the batch's reason is that one.
        with db.session_scope(engine) as session:
            job = store.get_job(session, job_id)
            output = json.loads(json.dumps(job.provider_output).replace(f":{first}/", f":{then}/"))
            store.update_job_fields(session, job_id, expected_version=job.version, provider_output=output)
        clock.now += 61
        make_due(engine, job_id)
        assert download(rt, job_id) == "download-held"
    finally:
        rt.client.close()
    batch = _batch(engine, batch_id)
    assert batch.state == BatchState.PAUSED
    reason = batch.pause_reason or ""
    assert reason.startswith("outputs cannot be downloaded here")
    assert f"127.0.0.1:{then}" in reason
    assert f"127.0.0.1:{first}" not in reason


def test_a_reason_that_keeps_changing_is_written_at_most_every_warn_every_seconds(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """Downloads of a paused batch failing on two hosts in turn (fal serves videos from
    several): each failure rewrote the batch's ~600-character reason, a write on its row per
    failed try for as long as the outage lasted, and ``status`` flickered between them. The
    reason is renewed at most every WARN_EVERY_SECONDS (per process), as the run's warning is."""
    fal = FakeFal(hostile)
    ports = _closed_port(), _closed_port()
    fal.on_result("r1", json_reply(fal.result_for("r1", url=f"http://127.0.0.1:{ports[0]}/files/r1.mp4")))
    rt, job_id = completed_job(engine, hostile, tmp_path, download_allowed_hosts=["127.0.0.1"])
    clock = _Clock()
    rt.download_reach = DownloadReach(clock)
    batch_id = _job(engine, job_id).batch_id

    def fails_on(port: int) -> str:
        with db.session_scope(engine) as session:
            job = store.get_job(session, job_id)
            text = json.dumps(job.provider_output)
            for other in ports:
                text = text.replace(f":{other}/", f":{port}/")
            store.update_job_fields(
                session, job_id, expected_version=job.version, provider_output=json.loads(text)
            )
        make_due(engine, job_id)
        download(rt, job_id)
        return _batch(engine, batch_id).pause_reason or ""

    try:
        assert download(rt, job_id) == "download-held"
        clock.now += 61
        make_due(engine, job_id)
        assert download(rt, job_id) == "outputs-paused"
        reasons = [_batch(engine, batch_id).pause_reason]
        for turn in range(6):  # a failure every 2 s, on one host then the other
            clock.now += 2
            reasons.append(fails_on(ports[(turn + 1) % 2]))
        written = sum(1 for a, b in itertools.pairwise(reasons) if a != b)
        assert written <= 1, written
        # Once the throttle allows it, the latest reason is the batch's.
        clock.now += WARN_EVERY_SECONDS
        latest = fails_on(ports[1])
        assert f"127.0.0.1:{ports[1]}" in latest
        assert f"127.0.0.1:{ports[0]}" not in latest
    finally:
        rt.client.close()
