"""A paid video on a host the download policy refuses (not on ``WANBATCH_DOWNLOAD_ALLOWED_HOSTS``,
or at an internal address) is held, never failed for good: a setting decides it.

The audit: such a refusal failed the job at once (``download_failed``, "cannot heal"); fixing the
setting changed nothing (the job was terminal) and ``rerun --failed-only`` paid for the video
again. The download step is driven directly against a hostile fal on both databases; its result
URL names ``localhost``, which resolves to loopback and is not fal's configured origin
(``127.0.0.1:PORT``).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from jobs import db, store
from jobs.models import BatchState, utcnow
from jobs.states import JobState
from tests.hostile import HostileProvider, json_reply, raw_reply
from tests.hostile_fal import FakeFal
from tests.integration.test_download_steps import KEY, completed_job
from tests.step_runtime import make_runtime, settings_for
from worker.steps import download

MP4 = {"Content-Type": "video/mp4"}


def _job(engine: Engine, job_id: str) -> Any:
    with db.session_scope(engine) as session:
        return store.get_job(session, job_id)


def _batch(engine: Engine, batch_id: str) -> Any:
    with db.session_scope(engine) as session:
        return store.get_batch(session, batch_id)


def _due(engine: Engine, job_id: str) -> None:
    """Make the waiting job due now, as time passing does (its retry time stays set: what tells
    a retried download, whose success may end its batch's pause)."""
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, next_attempt_at=utcnow() - timedelta(seconds=1)
        )


def _on_localhost(hostile: HostileProvider) -> FakeFal:
    fal = FakeFal(hostile)
    fal.on_result("r1", json_reply(fal.result_for("r1", url=f"http://localhost:{hostile.port}/files/r1.mp4")))
    fal.on_file("r1.mp4", raw_reply(fal.video, headers=MP4))
    return fal


def test_a_refused_host_holds_the_job_pauses_its_batch_and_the_setting_lets_it_through(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fal = _on_localhost(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path, download_attempts=2)
    batch_id = _job(engine, job_id).batch_id
    setting = f"WANBATCH_DOWNLOAD_ALLOWED_HOSTS=localhost:{hostile.port}"
    try:
        with caplog.at_level(logging.WARNING, logger="worker.steps.download"):
            assert download(rt, job_id) == "outputs-paused"
            # Far more tries than WANBATCH_DOWNLOAD_ATTEMPTS (2): still waiting, nothing counted,
            # said once (the pause's line), not at every try.
            for _ in range(3):
                _due(engine, job_id)
                assert download(rt, job_id) == "download-held"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert (job.state, job.download_attempts, job.error) == (JobState.DOWNLOADING, 0, None)
    assert job.provider_output is not None  # the result is kept: fal's expires, the video's URL does not
    assert job.next_attempt_at is not None
    batch = _batch(engine, batch_id)
    assert batch.state == BatchState.PAUSED
    reason = batch.pause_reason or ""
    assert reason.startswith("outputs cannot be downloaded here: ")
    assert "localhost (127.0.0.1): a loopback address" in reason
    assert setting in reason
    said = [r.getMessage() for r in caplog.records if "refus" in r.getMessage()]
    assert len(said) == 1, said
    assert setting in said[0]
    assert fal.file_gets("r1.mp4") == 0  # never connected

    # The user lists the host: the next try downloads it, the pause ends, nothing made again.
    fixed = make_runtime(
        engine,
        settings_for(
            hostile.url,
            KEY,
            output_dir=tmp_path / "outputs",
            download_allowed_hosts=[f"localhost:{hostile.port}"],
        ),
    )
    _due(engine, job_id)
    try:
        assert download(fixed, job_id) == "succeeded"
    finally:
        fixed.client.close()
    assert _job(engine, job_id).state == JobState.SUCCEEDED
    assert _batch(engine, batch_id).state == BatchState.ACTIVE
    assert fal.file_gets("r1.mp4") == 1
    assert fal.result_calls("r1") == 1  # the kept result, not asked again
    assert fal.posts() == 1


def test_a_refusal_past_fals_media_lifetime_ends_the_job_with_its_cost(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """The bound of the wait: fal keeps a video 7 days by default; past that since it made it,
    the refused job fails with its cost and the refusal's words, not held on unseen."""
    fal = _on_localhost(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        store.update_job_fields(
            session, job_id, expected_version=job.version, completed_at=utcnow() - timedelta(days=8)
        )
    try:
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert (job.state, job.error_type) == (JobState.FAILED, "download_failed")
    assert "7 days" in (job.error or "")
    assert "loopback address" in (job.error or "")
    assert job.actual_usd == job.est_usd
    assert fal.file_gets("r1.mp4") == 0
    assert fal.posts() == 1


def test_a_cancelled_batchs_refused_download_fails_at_once(
    engine: Engine, hostile: HostileProvider, tmp_path: Path
) -> None:
    """No setting changes while ``wanbatch cancel`` ends the batch: waiting would only hold it."""
    fal = _on_localhost(hostile)
    rt, job_id = completed_job(engine, hostile, tmp_path)
    batch_id = _job(engine, job_id).batch_id
    with db.session_scope(engine) as session:
        store.set_batch_state(session, batch_id, BatchState.CANCELLED, reason="cancelled by user")
    try:
        assert download(rt, job_id) == "failed"
    finally:
        rt.client.close()
    job = _job(engine, job_id)
    assert (job.state, job.error_type) == (JobState.FAILED, "download_failed")
    assert "its batch cancelled" in (job.error or "")
    assert job.actual_usd == job.est_usd
    assert fal.file_gets("r1.mp4") == 0
