"""A rerun's job that took back a staged paid video, seen afterwards: by ``reuse_outputs``, and
by the books when the job had been sent (and billed) before it took the video.

* Its output is its own upload, so ``reuse_outputs`` offers it to a twin, which then costs
  nothing (before, every job with ``reused_from`` was left out, and the only intact copy of the
  video was never offered: the twin was sent and paid for again). A job that reused another's
  output is still never offered: its output is its source's.
* Taking the video costs nothing more, but what fal billed the job's own earlier attempt stays
  on its books (before, taking it wrote 0 over that bill, and the batch's spent money fell).

Steps driven directly, on both databases, against moto's S3 server and a hostile fal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import billing, db, store
from jobs.rerun import rerun_batch
from jobs.states import JobState
from tests.hostile import HostileProvider
from tests.hostile_fal import FakeFal
from tests.integration.test_s3_staged_rerun import BUCKET, _job, _make_due, _staged, left_staged
from tests.s3_helpers import MotoS3, aws_env
from tests.step_runtime import job_ids
from worker.steps import dispatch, download, submit

pytestmark = pytest.mark.s3


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3]:
    with MotoS3() as server:
        aws_env(monkeypatch, server.url)
        yield server


def test_reuse_outputs_offers_the_video_a_rerun_took_back_and_never_a_reuse(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3, db_url: str
) -> None:
    fal = FakeFal(hostile)
    handed: list[str] = []
    rt, original_id = left_staged(engine, hostile, tmp_path, db_url, handed)
    try:
        s3.client().create_bucket(Bucket=BUCKET)
        rerun = rerun_batch(_job(engine, original_id).batch_id, failed_only=True, settings=rt.settings)
        assert dispatch(rt) == []
        (taker_id,) = handed
        assert download(rt, taker_id) == "succeeded"
        taker = _job(engine, taker_id)
        assert (taker.reused_from, taker.input.get("seed")) == (original_id, 42)
        assert _job(engine, original_id).output_path is None  # the taker's is the only copy

        # Its twin (the rerun run again: the same endpoint and input, seed pinned) with reuse_outputs
        again = rerun_batch(rerun.batch_id, settings=rt.settings)
        (twin_id,) = job_ids(engine, again.batch_id)
        with db.session_scope(engine) as session:
            store.set_batch_reuse_outputs(session, again.batch_id, True)
        assert (_job(engine, twin_id).job_key, _job(engine, twin_id).input) == (taker.job_key, taker.input)
        assert dispatch(rt) == []  # not sent: the taker's video is reused

        # A third twin: the reusing job is not offered (its output is the taker's), the taker is
        third = rerun_batch(again.batch_id, settings=rt.settings)
        (third_id,) = job_ids(engine, third.batch_id)
        with db.read_scope(engine) as session:
            offered = store.find_reusable(session, store.get_job(session, third_id), simulated=False, limit=5)
    finally:
        rt.client.close()
    twin = _job(engine, twin_id)
    assert (twin.state, twin.reused_from) == (JobState.SUCCEEDED, taker_id)
    assert twin.output_path == taker.output_path
    assert (twin.output_sha256, twin.actual_usd, twin.request_id) == (taker.output_sha256, Decimal(0), None)
    assert fal.posts() == 1  # rendered once, for the original
    assert [job.id for job in offered] == [taker_id]


def test_taking_the_staged_video_keeps_what_fal_billed_the_jobs_earlier_attempt(
    engine: Engine, hostile: HostileProvider, tmp_path: Path, s3: MotoS3, db_url: str
) -> None:
    fal = FakeFal(hostile)
    handed: list[str] = []
    rt, original_id = left_staged(engine, hostile, tmp_path, db_url, handed)
    try:
        (staged,) = _staged(tmp_path)
        aside = staged.with_name("aside")
        staged.rename(aside)  # the staging disk not mounted for a moment: the file "is gone"
        s3.client().create_bucket(Bucket=BUCKET)
        rerun = rerun_batch(_job(engine, original_id).batch_id, failed_only=True, settings=rt.settings)
        (sent,) = dispatch(rt)  # not taken: sent to fal
        assert submit(rt, sent) == "submitted"
        assert _job(engine, sent).state == JobState.QUEUED
        # fal started it, then the window closed: cancelled while running, billed in full
        with db.session_scope(engine) as session:
            j = store.get_job(session, sent)
            cost = billing.billed(
                billing.Outcome.CANCELLED_RUNNING,
                j.est_billing_units,
                j.est_usd,
                prior_units=j.actual_billing_units,
                prior_usd=j.actual_usd,
            )
            assert store.requeue_after_cancel(
                session,
                store.Fence.of(j, "poller"),
                reason="window closed",
                billed=True,
                error="cancelled running",
                error_type="window_closed",
                **cost,
            )
        before = _job(engine, sent)
        assert before.state == JobState.RETRY_WAIT
        assert before.actual_usd == before.est_usd > 0
        with db.read_scope(engine) as session:
            spent_before = store.batch_money(session, rerun.batch_id).spent_usd
        assert spent_before == before.actual_usd

        aside.rename(staged)  # the file is back: the retry takes it instead of sending again
        _make_due(engine, sent)
        assert dispatch(rt) == []
        assert handed == [sent]
        taking = _job(engine, sent)
        assert (taking.state, taking.est_usd) == (JobState.DOWNLOADING, Decimal(0))
        assert taking.actual_usd == before.actual_usd  # kept while it is stored
        assert taking.actual_billing_units == before.actual_billing_units
        assert download(rt, sent) == "succeeded"
    finally:
        rt.client.close()
    after = _job(engine, sent)
    assert (after.state, after.reused_from) == (JobState.SUCCEEDED, original_id)
    assert (after.actual_usd, after.actual_billing_units) == (before.actual_usd, before.actual_billing_units)
    with db.read_scope(engine) as session:
        money = store.batch_money(session, rerun.batch_id)
        assert money.spent_usd == spent_before
        assert store.batch_committed_usd(session, rerun.batch_id) == money.committed_usd == spent_before
    key = (after.output_path or "").removeprefix(f"s3://{BUCKET}/")
    sidecar = json.loads(s3.client().get_object(Bucket=BUCKET, Key=key[:-4] + ".json")["Body"].read())
    assert Decimal(sidecar["cost_usd"]) == before.actual_usd  # what the job cost: its own attempt
    assert fal.posts() == 2  # the original's request, and the rerun's job's one attempt
