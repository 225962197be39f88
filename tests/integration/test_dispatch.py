"""Dispatch against a real database: the outstanding cap, and its back-off when fal queues.

fal queues whatever it cannot run (accounts run 2 to 40 at once). When requests we sent are
still IN_QUEUE long after, dispatch keeps just one waiting at fal instead of filling the cap.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine

from jobs import db, store
from jobs.models import utcnow
from jobs.settings import Settings
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime
from worker.limits import api_key_id
from worker.steps import Runtime, dispatch

S = JobState


def _runtime(engine: Engine, sent: list[str], **settings: Any) -> Runtime:
    """Dispatch hands each claimed job to ``sent`` (it never calls fal)."""
    config = Settings(submit_rate=1000, max_outstanding=10, **settings)
    return make_runtime(engine, config, enqueue_submit=sent.append)


def _batch_of(engine: Engine, n: int) -> list[str]:
    jobs = [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(n)]
    batch_id = add_batch(engine, "dispatch", jobs, est_billing_units=Decimal(1), est_usd=Decimal("0.1"))
    return job_ids(engine, batch_id)


def _at_fal(engine: Engine, job_ids: list[str], state: JobState, waited: float) -> None:
    """Move jobs to ``state`` at fal as if submitted ``waited`` seconds ago."""
    with db.session_scope(engine) as session:
        for job_id in job_ids:
            assert store.transition(session, job_id, S.PENDING, S.SUBMITTING)
            assert store.transition(
                session,
                job_id,
                S.SUBMITTING,
                S.QUEUED,
                request_id=f"r-{job_id}",
                submitted_at=utcnow() - timedelta(seconds=waited),
            )
            if state == S.RUNNING:
                assert store.transition(session, job_id, S.QUEUED, S.RUNNING)


def test_dispatch_fills_the_cap_when_nothing_waits_long(engine: Engine) -> None:
    ids = _batch_of(engine, 20)
    _at_fal(engine, ids[:3], S.QUEUED, waited=5)  # queued, but not for long
    sent: list[str] = []
    assert len(dispatch(_runtime(engine, sent, queue_wait_backoff=60))) == 7
    assert len(sent) == 7


def test_dispatch_holds_back_while_requests_wait_in_fals_queue(engine: Engine) -> None:
    ids = _batch_of(engine, 20)
    _at_fal(engine, ids[:3], S.QUEUED, waited=120)  # the account runs fewer than we send
    sent: list[str] = []
    assert dispatch(_runtime(engine, sent, queue_wait_backoff=60)) == []
    assert sent == []


def test_dispatch_keeps_one_waiting_when_the_long_waiters_started_running(engine: Engine) -> None:
    ids = _batch_of(engine, 20)
    _at_fal(engine, ids[:2], S.RUNNING, waited=120)
    _at_fal(engine, ids[2:3], S.QUEUED, waited=90)  # still one long waiter, and it is the only one queued
    rt = _runtime(engine, [], queue_wait_backoff=60)
    assert dispatch(rt) == []  # one request already waits at fal: enough
    with db.session_scope(engine) as session:
        assert store.transition(session, ids[2], S.QUEUED, S.RUNNING)
    assert len(dispatch(rt)) == 7  # nothing waits any more: the full cap again


def test_backoff_off_when_zero(engine: Engine) -> None:
    ids = _batch_of(engine, 20)
    _at_fal(engine, ids[:3], S.QUEUED, waited=600)
    assert len(dispatch(_runtime(engine, [], queue_wait_backoff=0))) == 7


def test_the_outstanding_cap_is_per_api_key(engine: Engine) -> None:
    ids = _batch_of(engine, 30)
    _at_fal(engine, ids[:8], S.RUNNING, waited=1)
    with db.session_scope(engine) as session:  # those 8 were sent with another account's key
        for job_id in ids[:8]:
            job = store.get_job(session, job_id)
            assert store.update_job_fields(
                session, job_id, expected_version=job.version, api_key_id="other-key"
            )
    sent: list[str] = []
    rt = _runtime(engine, sent, fal_key="key-of-this-deployment")
    assert len(dispatch(rt)) == 10  # the other key's 8 leave this key's cap of 10 untouched
    with db.session_scope(engine) as session:
        mine = {store.get_job(session, job_id).api_key_id for job_id in sent}
    assert mine == {api_key_id(rt.settings)}
    assert "key-of-this-deployment" not in str(next(iter(mine)))
    assert dispatch(rt) == []  # and now this key's cap is full


def _downloading(engine: Engine, job_ids: list[str]) -> None:
    """Move jobs on to ``downloading``: completed at fal, the output not yet stored."""
    _at_fal(engine, job_ids, S.RUNNING, waited=1)
    with db.session_scope(engine) as session:
        for job_id in job_ids:
            assert store.transition(session, job_id, S.RUNNING, S.DOWNLOADING)


def test_stalled_downloads_hold_submits_back(engine: Engine) -> None:
    """Paid outputs must not pile up at fal (where they expire) while downloads stall."""
    ids = _batch_of(engine, 30)
    _downloading(engine, ids[:8])
    rt = _runtime(engine, [], max_download_backlog=10)
    sent = dispatch(rt)
    assert len(sent) == 2  # the cap allows 10, the backlog only 2 more
    with db.session_scope(engine) as session:
        for job_id in sent:  # both complete at fal; their downloads stall too
            assert store.transition(session, job_id, S.SUBMITTING, S.QUEUED, request_id=f"r-{job_id}")
            assert store.transition(session, job_id, S.QUEUED, S.DOWNLOADING)
    assert dispatch(rt) == []  # backlog full: nothing sent, whatever the free slots
    with db.session_scope(engine) as session:
        assert store.transition(session, ids[0], S.DOWNLOADING, S.SUCCEEDED)
    assert len(dispatch(rt)) == 1  # one download done: one more may go


def test_the_download_backlog_defaults_to_the_outstanding_cap(engine: Engine) -> None:
    ids = _batch_of(engine, 30)
    _downloading(engine, ids[:7])
    assert len(dispatch(_runtime(engine, []))) == 3  # max_outstanding 10 - 7 waiting for download
