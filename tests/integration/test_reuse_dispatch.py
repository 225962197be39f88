"""``reuse_outputs`` in dispatch, on SQLite and PostgreSQL: a claimed pinned-seed job whose twin
(same key, another batch) succeeded takes its output in the claim's transaction, never sent. The
twin's video is read (hashed) with no transaction open, between two rounds."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from jobs import db, output_store, store
from jobs.models import BatchState, utcnow
from jobs.settings import Settings
from jobs.states import JobState
from tests.s3_helpers import MotoS3, S3FaultProxy, aws_env
from tests.step_runtime import add_batch, job_ids, make_runtime
from worker.steps import dispatch, dispatch_in, verified_outputs

S = JobState
JOBS: list[tuple[str, dict[str, Any]]] = [
    ("fal-ai/wan-22", {"prompt": "a fox", "seed": 5}),
    ("fal-ai/wan-22", {"prompt": "a fox"}),
]


def _succeed(engine: Engine, job_id: str, video: Path | str, body: bytes | None = None) -> None:
    """Take ``job_id`` through fal to ``succeeded`` with ``video`` as its output (a local file,
    or an ``s3://`` URI holding ``body``), its size and SHA-256 recorded as the download step
    records them."""
    if isinstance(video, Path):
        body = video.read_bytes()
    assert body is not None
    with db.session_scope(engine) as session:
        assert store.transition(session, job_id, S.PENDING, S.SUBMITTING)
        assert store.transition(session, job_id, S.SUBMITTING, S.QUEUED, request_id=f"r-{job_id}")
        assert store.transition(session, job_id, S.QUEUED, S.DOWNLOADING)
        assert store.transition(
            session,
            job_id,
            S.DOWNLOADING,
            S.SUCCEEDED,
            output_path=str(video),
            output_sha256=hashlib.sha256(body).hexdigest(),
            output_bytes=len(body),
            seed=5,
            actual_prompt="a fox, expanded",
            actual_usd=Decimal("0.4"),
        )


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _second_batch(engine: Engine, reuse: bool) -> list[str]:
    batch_id = add_batch(engine, "again", JOBS, est_usd=Decimal("0.4"))
    with db.session_scope(engine) as session:
        store.set_batch_reuse_outputs(session, batch_id, reuse)
        store.set_batch_budget(session, batch_id, Decimal("0.5"))  # room for one job's estimate
    return job_ids(engine, batch_id)


def test_a_pinned_seed_twin_is_reused_and_an_unseeded_one_sent(engine: Engine, tmp_path: Path) -> None:
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    first = job_ids(engine, add_batch(engine, "first", JOBS))
    for job_id in first:
        _succeed(engine, job_id, video)
    seeded, unseeded = _second_batch(engine, reuse=True)

    sent: list[str] = []
    done: list[tuple[str, str]] = []
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10), enqueue_submit=sent.append)
    rt.notify = lambda kind, job_id: done.append((kind, job_id))
    assert dispatch(rt) == [unseeded]  # the budget held the unseeded job's estimate: none reserved
    assert sent == [unseeded]
    assert done == [("done", seeded)]
    with db.session_scope(engine) as session:
        job = store.get_job(session, seeded)
        assert job.state == S.SUCCEEDED
        assert job.reused_from == first[0]
        assert (job.output_path, job.output_sha256, job.seed) == (str(video), _sha(b"video bytes"), 5)
        assert job.actual_prompt == "a fox, expanded"
        assert job.actual_usd == 0
        assert job.request_id is None
        assert job.attempts == 0
        assert job.lease_owner is None
        assert [e.to_state for e in store.job_events(session, seeded)] == [S.SUCCEEDED]


def test_without_reuse_outputs_or_the_file_every_job_is_sent(engine: Engine, tmp_path: Path) -> None:
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    for job_id in job_ids(engine, add_batch(engine, "first", JOBS)):
        _succeed(engine, job_id, video)
    ids = _second_batch(engine, reuse=False)
    sent: list[str] = []
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10), enqueue_submit=sent.append)
    with db.session_scope(engine) as session:
        store.set_batch_budget(session, store.get_job(session, ids[0]).batch_id, None)
    assert sorted(dispatch(rt)) == sorted(ids)

    video.unlink()  # reuse on, but the original's file is gone: sent
    third = add_batch(engine, "third", JOBS[:1])
    with db.session_scope(engine) as session:
        store.set_batch_reuse_outputs(session, third, True)
    assert dispatch(rt) == job_ids(engine, third)


def test_a_symlink_in_the_originals_place_is_not_reused(engine: Engine, tmp_path: Path) -> None:
    """Something else standing at the stored video's path, even of the same size, is not the video
    the job made: the twin is sent, not pointed at it."""
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    for job_id in job_ids(engine, add_batch(engine, "first", JOBS)):
        _succeed(engine, job_id, video)
    other = tmp_path / "other.bin"
    other.write_bytes(b"other bytes")  # the same size
    video.unlink()
    video.symlink_to(other)
    third = add_batch(engine, "third", JOBS[:1])
    with db.session_scope(engine) as session:
        store.set_batch_reuse_outputs(session, third, True)
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    assert dispatch(rt) == job_ids(engine, third)  # sent, not reused


def _reusing(engine: Engine, name: str, jobs: list[tuple[str, dict[str, Any]]] = JOBS[:1]) -> str:
    batch_id = add_batch(engine, name, jobs)
    with db.session_scope(engine) as session:
        store.set_batch_reuse_outputs(session, batch_id, True)
    return batch_id


def _reused_from(engine: Engine, job_id: str) -> str | None:
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert job.state == S.SUCCEEDED
        return job.reused_from


def test_a_later_twin_is_reused_when_the_originals_file_is_gone(engine: Engine, tmp_path: Path) -> None:
    """The oldest twin's video is deleted, a rerun's is intact: the rerun's is taken, never paid
    again (only the oldest was looked at, so every later batch paid for the render again)."""
    first, rerun = tmp_path / "first.mp4", tmp_path / "rerun.mp4"
    first.write_bytes(b"video bytes")
    rerun.write_bytes(b"video bytes, rerun")
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, first)
    (again,) = job_ids(engine, add_batch(engine, "lc-rerun-1", JOBS[:1]))
    _succeed(engine, again, rerun)
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    (took_first,) = job_ids(engine, _reusing(engine, "copy"))
    assert dispatch(rt) == []
    assert _reused_from(engine, took_first) == original  # the oldest, while its file is there

    first.unlink()  # the original's and its reuser's video are gone; the rerun's is not
    (later,) = job_ids(engine, _reusing(engine, "later"))
    assert dispatch(rt) == []  # not sent, not paid
    assert _reused_from(engine, later) == again
    with db.session_scope(engine) as session:
        assert store.get_job(session, later).output_path == str(rerun)

    rerun.unlink()  # every twin's video is gone: sent
    (last,) = job_ids(engine, _reusing(engine, "last"))
    assert dispatch(rt) == [last]


def _flip_a_byte(video: Path, at: int = 3) -> None:
    """Change one byte of ``video`` in place: the same size, other bytes."""
    data = bytearray(video.read_bytes())
    data[at] ^= 0xFF
    video.write_bytes(bytes(data))


def test_a_twin_whose_video_changed_since_it_was_stored_is_not_reused(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One byte of the stored video flipped (same size): its SHA-256 is no longer the recorded
    one, so a reusing job would record a SHA-256 its file does not have. Not taken: the next
    twin's intact video is, or the job is sent; one warning names the file."""
    first, rerun = tmp_path / "first.mp4", tmp_path / "rerun.mp4"
    first.write_bytes(b"video bytes")
    rerun.write_bytes(b"video bytes, rerun")
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, first)
    (again,) = job_ids(engine, add_batch(engine, "lc-rerun-1", JOBS[:1]))
    _succeed(engine, again, rerun)
    _flip_a_byte(first)
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))

    (later,) = job_ids(engine, _reusing(engine, "later"))
    with caplog.at_level(logging.WARNING):
        assert dispatch(rt) == []  # not sent: the rerun's video is intact
    assert _reused_from(engine, later) == again
    with db.session_scope(engine) as session:
        job = store.get_job(session, later)
        assert (job.output_path, job.output_sha256) == (str(rerun), _sha(rerun.read_bytes()))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(first) in warnings[0]
    assert "changed since it was stored" in warnings[0]
    assert f"not reusing the output of job {original}" in warnings[0]

    caplog.clear()
    _flip_a_byte(rerun)  # every twin's video changed: sent, rendered again
    (last,) = job_ids(engine, _reusing(engine, "last"))
    with caplog.at_level(logging.WARNING):
        assert dispatch(rt) == [last]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all("changed since it was stored" in w for w in warnings), warnings


def test_a_twin_whose_video_has_another_size_is_not_reused_and_said(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, video)
    video.write_bytes(b"video bytes and more")
    (later,) = job_ids(engine, _reusing(engine, "later"))
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    with caplog.at_level(logging.WARNING):
        assert dispatch(rt) == [later]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(video) in warnings[0]
    assert "20 bytes, not the 11 recorded" in warnings[0]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_twins_video_is_read_while_the_database_takes_writes(
    engine: Engine, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing a twin's video reads all of it (a GET of the object, for S3). It used to happen in
    the dispatch round's transaction: SQLite's write lock was held for the whole read of every
    reused video, and any other writer waited on its busy timeout. While the video is read now,
    another connection writes at once (busy timeout 0), and the job is reused all the same."""
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, video)
    (later,) = job_ids(engine, _reusing(engine, "later"))
    writes: list[str] = []
    real = output_store.output_sha256

    def read_while_another_writes(path: str) -> str | None:
        other = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("CREATE TABLE IF NOT EXISTS other_writer (n INTEGER)")
            other.execute("INSERT INTO other_writer VALUES (1)")
            other.execute("COMMIT")
            writes.append("written")
        except sqlite3.OperationalError as exc:
            writes.append(str(exc))
        finally:
            other.close()
        return real(path)

    monkeypatch.setattr(output_store, "output_sha256", read_while_another_writes)
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    assert dispatch(rt) == []
    assert writes == ["written"]  # was: ["database is locked"]
    assert _reused_from(engine, later) == original


def _replace_keeping_times(video: Path) -> None:
    """Put other bytes of the same size at ``video``'s path, its modification time kept (as a
    copy with ``cp -p`` or ``rsync -t`` would): a new file renamed over it."""
    info = video.stat()
    data = bytearray(video.read_bytes())
    data[3] ^= 0xFF
    swap = video.with_name(video.name + ".swap")
    swap.write_bytes(bytes(data))
    os.utime(swap, ns=(info.st_atime_ns, info.st_mtime_ns))
    os.replace(swap, video)


@pytest.mark.parametrize("settled", [False, True], ids=["just-written", "settled"])
def test_a_video_replaced_between_its_read_and_the_claim_is_not_reused(
    engine: Engine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    settled: bool,
) -> None:
    """The round that claims a reusing job reads no video: the job goes back (pending, due at
    once), the twin's video is read after the round committed, and the next round decides on
    what it sees *then*. A video replaced in between by other bytes of its size (its times
    kept) is not taken for the bytes read before: it is read again, and passed over. ``settled``:
    a video older than the clock's tick, whose digest the process keeps for later rounds too."""
    if settled:
        monkeypatch.setattr(verified_outputs, "RACY_SECONDS", 0.0)
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, video)
    (later,) = job_ids(engine, _reusing(engine, "later"))
    reads: list[str] = []
    real = output_store.output_sha256

    def counted(path: str) -> str | None:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(output_store, "output_sha256", counted)
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    with db.session_scope(engine) as session:
        first = dispatch_in(session, rt)
        assert reads == []  # nothing read in the transaction
    assert (first.reused, first.sent) == ([], [])
    assert first.hand_on(rt) == []
    assert reads == [str(video)]  # read once the round committed
    with db.session_scope(engine) as session:
        job = store.get_job(session, later)
        assert (job.state, job.lease_owner, job.next_attempt_at, job.attempts) == (S.PENDING, None, None, 0)
        assert store.job_events(session, later) == []

    _replace_keeping_times(video)
    with caplog.at_level(logging.WARNING):
        assert dispatch(rt) == [later]  # sent: rendered again, not given the other bytes
    assert reads == [str(video), str(video)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"not reusing the output of job {original}: {video} changed since it was stored" in warnings[0]


def test_a_settled_video_is_read_once_for_its_twins(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A video many jobs reuse, older than the clock's tick when read: read once for the process,
    its ``lstat`` checked by every claim after."""
    monkeypatch.setattr(verified_outputs, "RACY_SECONDS", 0.0)
    video = tmp_path / "first.mp4"
    video.write_bytes(b"video bytes")
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, video)
    reads: list[str] = []
    real = output_store.output_sha256

    def counted(path: str) -> str | None:
        reads.append(path)
        return real(path)

    monkeypatch.setattr(output_store, "output_sha256", counted)
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    for name in ("one", "two", "three"):
        (job_id,) = job_ids(engine, _reusing(engine, name))
        assert dispatch(rt) == []
        assert _reused_from(engine, job_id) == original
    assert reads == [str(video)]


# --------------------------------------------------------------------------- outputs in S3

BUCKET = "reuse-checks"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    with MotoS3() as server:
        aws_env(monkeypatch, server.url)
        server.client().create_bucket(Bucket=BUCKET)
        yield server


def _stored(s3: MotoS3, key: str, body: bytes) -> str:
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=body)
    return f"s3://{BUCKET}/{key}"


@pytest.mark.s3
def test_s3_a_later_twins_object_is_reused_when_the_originals_is_gone(engine: Engine, s3: MotoS3) -> None:
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, _stored(s3, "tokyo/lc/0.mp4", b"video"), b"video")
    (again,) = job_ids(engine, add_batch(engine, "lc-rerun-1", JOBS[:1]))
    _succeed(engine, again, _stored(s3, "tokyo/lc-rerun-1/0.mp4", b"video"), b"video")
    s3.client().delete_object(Bucket=BUCKET, Key="tokyo/lc/0.mp4")
    (later,) = job_ids(engine, _reusing(engine, "later"))
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    assert dispatch(rt) == []
    assert _reused_from(engine, later) == again


@pytest.mark.s3
def test_s3_a_refused_check_pauses_the_batch_and_sends_nothing(
    engine: Engine, s3: MotoS3, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Credentials that may not read (HEAD answers 403): not a reason to pay for the render
    again. Nothing of the batch is sent (not even its unseeded job); it is paused, one line."""
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, _stored(s3, "tokyo/lc/0.mp4", b"video"), b"video")
    batch_id = _reusing(engine, "later", JOBS)
    sent: list[str] = []
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10), enqueue_submit=sent.append)
    with S3FaultProxy(s3.port) as proxy, caplog.at_level(logging.WARNING):
        aws_env(monkeypatch, proxy.url)
        proxy.refuse_heads("")
        assert dispatch(rt) == []
        assert proxy.rules.refused == [f"/{BUCKET}/tokyo/lc/0.mp4"]
    assert sent == []
    with db.session_scope(engine) as session:
        batch = store.get_batch(session, batch_id)
        assert batch.state == BatchState.PAUSED
        reason = batch.pause_reason or ""
        assert [j.state for j in store.jobs_of_batch(session, batch_id)] == [S.PENDING, S.PENDING]
    assert reason.startswith(store.OUTPUTS_PAUSE_PREFIX + "be read back to reuse them (reuse_outputs): ")
    assert f"access denied to bucket '{BUCKET}'" in reason
    assert "\n" not in reason
    assert any(r.levelno == logging.WARNING and "batch paused" in r.getMessage() for r in caplog.records)


@pytest.mark.s3
def test_s3_an_unreachable_storage_delays_the_job_then_pauses_its_batch(
    engine: Engine, s3: MotoS3, caplog: pytest.LogCaptureFixture
) -> None:
    """Storage that cannot be reached: the job waits (pending, checked again after the backoff),
    up to WANBATCH_DOWNLOAD_ATTEMPTS checks; then its batch is paused. Never sent meanwhile."""
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    _succeed(engine, original, _stored(s3, "tokyo/lc/0.mp4", b"video"), b"video")
    batch_id = _reusing(engine, "later")
    (later,) = job_ids(engine, batch_id)
    settings = Settings(submit_rate=1000, max_outstanding=10, download_attempts=2, retry_base_delay=30)
    rt = make_runtime(engine, settings)
    s3.stop()
    before = utcnow()
    with caplog.at_level(logging.WARNING):
        assert dispatch(rt) == []
    with db.session_scope(engine) as session:
        job = store.get_job(session, later)
        assert job.state == S.PENDING
        assert job.next_attempt_at is not None
        assert job.next_attempt_at >= before + timedelta(seconds=30)  # the backoff's first delay
        assert store.get_batch(session, batch_id).state == BatchState.ACTIVE
        store.update_job_fields(session, later, expected_version=job.version, next_attempt_at=None)
    assert any(
        r.levelno == logging.WARNING and "checking again in 30s (try 1 of 2)" in r.getMessage()
        for r in caplog.records
    )
    assert dispatch(rt) == []
    with db.session_scope(engine) as session:
        assert store.get_job(session, later).state == S.PENDING
        batch = store.get_batch(session, batch_id)
        assert batch.state == BatchState.PAUSED
        assert "cannot reach" in (batch.pause_reason or "")
        assert "(after 2 tries)" in (batch.pause_reason or "")


@pytest.mark.s3
def test_s3_an_object_replaced_by_other_bytes_of_its_size_is_not_reused(
    engine: Engine, s3: MotoS3, caplog: pytest.LogCaptureFixture
) -> None:
    """The HEAD sees the recorded size; the object's bytes (read back and hashed) are others."""
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    uri = _stored(s3, "tokyo/lc/0.mp4", b"video")
    _succeed(engine, original, uri, b"video")
    _stored(s3, "tokyo/lc/0.mp4", b"vidEo")
    (later,) = job_ids(engine, _reusing(engine, "later"))
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    with caplog.at_level(logging.WARNING):
        assert dispatch(rt) == [later]  # sent
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert uri in warnings[0]
    assert "changed since it was stored" in warnings[0]

    _stored(s3, "tokyo/lc/0.mp4", b"video")  # the stored bytes back: reused again
    (back,) = job_ids(engine, _reusing(engine, "back"))
    assert dispatch(rt) == []
    assert _reused_from(engine, back) == original


@pytest.mark.s3
def test_s3_an_object_replaced_between_its_read_and_the_claim_is_not_reused(
    engine: Engine, s3: MotoS3, caplog: pytest.LogCaptureFixture
) -> None:
    """The object is read (GET, hashed) after the round that claimed the job committed; replaced
    by other bytes of its size before the next round claims it, its ETag is another: not taken,
    the new bytes read and passed over, the job sent."""
    (original,) = job_ids(engine, add_batch(engine, "lc", JOBS[:1]))
    uri = _stored(s3, "tokyo/lc/0.mp4", b"video")
    _succeed(engine, original, uri, b"video")
    (later,) = job_ids(engine, _reusing(engine, "later"))
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10))
    with db.session_scope(engine) as session:
        first = dispatch_in(session, rt)
    assert (first.reused, first.sent) == ([], [])  # nothing read in the transaction: not decided
    assert [[c.path for c in job] for job in first.unverified] == [[uri]]
    assert first.hand_on(rt) == []
    _stored(s3, "tokyo/lc/0.mp4", b"vidEo")
    with caplog.at_level(logging.WARNING):
        assert dispatch(rt) == [later]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"{uri} changed since it was stored" in warnings[0]


def test_a_twin_whose_project_moved_is_reused_from_the_output_folder(engine: Engine, tmp_path: Path) -> None:
    """The twin's recorded video is under an output folder that moved (the project folder moved:
    audit r3): the same ``<batch folder>/<file>`` under the current ``WANBATCH_OUTPUT_DIR``,
    with the recorded SHA-256, is reused, not paid for again, and the twin's path recorded."""
    old = tmp_path / "old" / "outputs" / "first" / "000000-a.mp4"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"video bytes")
    (first,) = job_ids(engine, add_batch(engine, "first", JOBS[:1]))
    _succeed(engine, first, old)
    root = tmp_path / "new" / "outputs"
    (tmp_path / "old").rename(tmp_path / "new")
    moved = root / "first" / "000000-a.mp4"
    third = _reusing(engine, "third")
    rt = make_runtime(engine, Settings(submit_rate=1000, max_outstanding=10, output_dir=root))
    assert dispatch(rt) == []  # reused, nothing sent
    [job_id] = job_ids(engine, third)
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        assert (job.state, job.reused_from, job.output_path) == (S.SUCCEEDED, first, str(moved))
        assert store.get_job(session, first).output_path == str(moved)
