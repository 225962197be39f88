"""Submits whose answer was lost count against the daily budget, under the day they were sent.

A submit whose answer never came (``submit_unknown``) may have been accepted and billed. The
batch cap has always counted that money (``ambiguous_usd``); the daily cap
(``WANBATCH_DAILY_BUDGET_USD``) counted a job's money under the day of its ``submitted_at``,
which only fal's answer set: such a job had none, its money was booked under no day, and fal
billed twice the daily cap. The job was sent: its ``submitted_at`` is now when its POST went
out, and the export says so, with its attempt counted and no request id (the error says the
outcome is unknown).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine

from jobs import db, export, store
from jobs.models import Job, utcnow
from jobs.money import DAILY_CAP_ERROR
from jobs.states import JobState
from tests.hostile import HostileProvider, reset
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.steps import dispatch, submit

S = JobState
KEY = "7a1c0e9f-2b3d-4e5f-8a9b-0c1d2e3f4a5b:1f2e3d4c5b6a79880796a5b4c3d2e1f0"
T2V = "fal-ai/wan-22"
WAN = (T2V, INPUTS[T2V])


def _jobs(engine: Engine, batch_id: str) -> list[Job]:
    with db.session_scope(engine) as session:
        jobs = list(store.jobs_of_batch(session, batch_id))
        session.expunge_all()
        return jobs


def _today(engine: Engine) -> tuple[Decimal, Decimal]:
    """(the daily budget check's figure, the full sum over the jobs) for today (UTC)."""
    now = utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with db.read_scope(engine) as session:
        return store.committed_usd_today(session, now), store.committed_usd_since(session, midnight)


@pytest.mark.parametrize("policy", ["fail", "resubmit"])
def test_the_daily_cap_counts_what_lost_answers_may_have_cost(
    engine: Engine, hostile: HostileProvider, policy: str
) -> None:
    hostile.route("POST", rf"/{T2V}", reset())  # every request arrives; no answer ever does
    settings = settings_for(
        hostile.url,
        KEY,
        max_outstanding=1,
        daily_budget_usd=Decimal("1.00"),
        submit_unknown_policy=policy,
        max_attempts=1,  # resubmit: no attempt left, so each job is sent once and fails
    )
    rt = make_runtime(engine, settings)
    batch_id = add_batch(engine, "daily-unknown", [WAN] * 10, est_usd=Decimal("0.25"))
    try:
        for _ in range(30):  # one job per round (the outstanding cap), as a run does
            for job_id in dispatch(rt):
                assert submit(rt, job_id) == "failed"  # no receiver, no attempt left: settled at once
            if not any(j.state == S.PENDING for j in _jobs(engine, batch_id)):
                break
    finally:
        rt.client.close()

    # $0.25 each, possibly billed: four fill the $1.00 cap; fal got no more than four requests.
    assert hostile.count("POST", rf"/{T2V}") == 4
    jobs = _jobs(engine, batch_id)
    sent = [j for j in jobs if j.state == S.FAILED]
    refused = [j for j in jobs if j.state == S.CANCELLED]
    assert (len(sent), len(refused)) == (4, 6)
    assert all(j.error_type == DAILY_CAP_ERROR for j in refused)
    assert _today(engine) == (Decimal("1.00"), Decimal("1.00"))

    # Another batch the same day gets nothing: the day's money is spent.
    other = add_batch(engine, "daily-unknown-2", [WAN] * 2, est_usd=Decimal("0.25"))
    for _ in range(2):  # a job per round
        assert dispatch(make_runtime(engine, settings)) == []
    assert {j.error_type for j in _jobs(engine, other)} == {DAILY_CAP_ERROR}

    # The export says each was sent (when, with its attempt), and that its request id is unknown.
    with db.read_scope(engine) as session:
        batch = store.get_batch(session, batch_id)
        for job in sent:
            row = export.record(job, batch, Path("/tmp"))
            assert row["submitted_at"] is not None
            assert row["attempts"] == 1
            assert row["request_id"] is None
            assert row["error_type"] == "submit_unknown"
            assert "may have accepted (and billed) it" in row["error"]
        for job in refused:
            row = export.record(job, batch, Path("/tmp"))
            assert (row["submitted_at"], row["attempts"], row["request_id"]) == (None, 0, None)


def _sent_and_lost(engine: Engine, job: Job, sent_at: datetime) -> Job:
    """``job`` (pending) claimed, its POST sent at ``sent_at``, its answer lost."""
    with db.session_scope(engine) as session:
        fence = store.Fence.of(job, "test")
        assert store.mark_submitting(
            session, fence, attempt=job.attempts + 1, api_key_id="k", lease_expires_at=utcnow()
        )
        fence = fence.moved(S.SUBMITTING)
        taken = store.take_lease(
            session, fence, now=utcnow(), lease_seconds=60, submitted_input={"prompt": "x"}, sent_at=sent_at
        )
        assert taken is not None
        assert store.mark_submit_unknown(session, taken, why="lost", due_at=utcnow())
        found = store.get_job(session, job.id)
        session.expunge(found)
        return found


def test_a_lost_answer_is_counted_under_the_day_its_post_went_out(engine: Engine) -> None:
    """Resent, waiting, given back or failed: the money counts today when the POST went out
    today, and under yesterday (not today, nor no day) when it went out just before midnight."""
    batch_id = add_batch(engine, "sent-days", [WAN] * 3, est_usd=Decimal("0.25"))
    now = utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    today_job, yesterday_job, given_back = _jobs(engine, batch_id)

    sent_today = midnight + (now - midnight) / 2  # whenever the test runs
    lost = _sent_and_lost(engine, today_job, sent_today)
    assert lost.submitted_at == sent_today
    assert _today(engine) == (Decimal("0.25"), Decimal("0.25"))  # at fal, maybe
    with db.session_scope(engine) as session:  # resubmit: waits for its next attempt
        assert store.retry_later(session, store.Fence.of(lost), reason="resend", possible_duplicate=True)
    assert _today(engine) == (Decimal("0.25"), Decimal("0.25"))

    late = _sent_and_lost(engine, yesterday_job, midnight - timedelta(microseconds=1))
    with db.session_scope(engine) as session:
        assert store.fail_job(session, store.Fence.of(late), error="unknown", error_type="submit_unknown")
    assert _today(engine) == (Decimal("0.25"), Decimal("0.25"))  # yesterday's, not today's

    third = _sent_and_lost(engine, given_back, now)
    with db.session_scope(engine) as session:  # resent, then its POST never left: pending again
        assert store.retry_later(session, store.Fence.of(third), reason="resend", possible_duplicate=True)
        job = store.get_job(session, third.id)
        fence = store.Fence.of(job)
        assert store.mark_submitting(session, fence, attempt=2, api_key_id="k", lease_expires_at=now)
        assert store.give_back(session, fence.moved(S.SUBMITTING), reason="not sent")
    assert _today(engine) == (Decimal("0.50"), Decimal("0.50"))
    with db.read_scope(engine) as session:
        assert store.batch_money(session, batch_id).committed_usd == Decimal("0.75")
        day_before = (midnight - timedelta(days=1)).replace(hour=12)
        assert store.committed_usd_since(session, day_before) == Decimal("0.75")


def test_a_lost_answer_shows_no_earlier_attempts_request_id(engine: Engine) -> None:
    """Attempt 1 was accepted as R1 and failed at fal; attempt 2's answer is lost: the job's
    request is attempt 2's, whose id is unknown — not R1 (which the history keeps)."""
    batch_id = add_batch(engine, "earlier-id", [WAN], est_usd=Decimal("0.25"))
    (job,) = _jobs(engine, batch_id)
    first_sent = utcnow() - timedelta(minutes=5)
    with db.session_scope(engine) as session:
        fence = store.Fence.of(job, "test")
        assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=utcnow())
        fence = fence.moved(S.SUBMITTING)
        assert store.mark_submitted(
            session,
            fence,
            running=False,
            request_id="r1-accepted",
            gateway_request_id=None,
            status_url=None,
            response_url=None,
            cancel_url=None,
            submitted_at=first_sent,
            next_poll_at=utcnow(),
        )
        assert store.retry_later(session, fence.moved(S.QUEUED), reason="HTTP 503", error="HTTP 503")
    (job,) = _jobs(engine, batch_id)
    assert job.request_id == "r1-accepted"
    second_sent = utcnow()
    lost = _sent_and_lost(engine, job, second_sent)
    assert (lost.attempts, lost.request_id, lost.submitted_at) == (2, None, second_sent)
    with db.read_scope(engine) as session:
        assert store.request_known(session, lost.id, "r1-accepted")  # its history keeps R1
