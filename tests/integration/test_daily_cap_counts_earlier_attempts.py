"""The daily budget counts what a job's earlier attempts cost while the job is back at fal.

A job counts, whatever its state, at least what its earlier attempts cost plus its current
attempt's estimate (README, "Budgets are never exceeded"). The batch cap always did; the day's
sum (``WANBATCH_DAILY_BUDGET_USD``) counted a job at fal by its estimate alone, so a job whose
window closed on it running (billed, back to ``retry_wait``) and that was sent again the same
UTC day dropped that bill from the day, and one more job was let in past the daily cap. Both
sums now count a job by one definition (:func:`jobs.store.committed_usd`).
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.billing import Outcome
from jobs.models import Job, utcnow
from jobs.money import DAILY_CAP_ERROR
from jobs.states import JobState
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch, make_runtime, settings_for
from worker.fal.models import Status
from worker.steps import dispatch
from worker.steps.schedule import WINDOW_CLOSED, end_unstarted

S = JobState
KEY = "daily-cap-earlier-attempts-key"
WAN = ("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])


def _job(engine: Engine, batch_id: str) -> Job:
    with db.session_scope(engine) as session:
        (job,) = store.jobs_of_batch(session, batch_id)
        session.expunge(job)
        return job


def _today(engine: Engine) -> tuple[Decimal, Decimal]:
    """(the daily budget check's figure, the full sum over the jobs) for today (UTC)."""
    now = utcnow()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with db.read_scope(engine) as session:
        return store.committed_usd_today(session, now), store.committed_usd_since(session, midnight)


def _mark_sent(session: Session, fence: store.Fence, attempt: int, *, running: bool) -> store.Fence:
    """fal accepted the ``submitting`` job's POST: ``queued`` (or ``running``)."""
    assert store.mark_submitted(
        session,
        fence,
        running=running,
        request_id=f"request-{attempt}",
        gateway_request_id=None,
        status_url=None,
        response_url=None,
        cancel_url=None,
        submitted_at=utcnow(),
        next_poll_at=utcnow(),
    )
    return fence.moved(S.RUNNING if running else S.QUEUED)


def _billed_and_back(engine: Engine, batch_id: str) -> None:
    """The batch's job sent, the window closing on it while it ran at fal: billed its estimate
    ($0.25, cancelled running), back to ``retry_wait`` for the next window."""
    job = _job(engine, batch_id)
    with db.session_scope(engine) as session:
        fence = store.Fence.of(job, "test")
        assert store.mark_submitting(session, fence, attempt=1, api_key_id="k", lease_expires_at=utcnow())
        fence = _mark_sent(session, fence.moved(S.SUBMITTING), 1, running=True)
        job = store.get_job(session, job.id)
        cancelled = Status("COMPLETED", error="cancelled", error_type="client_cancelled")
        assert end_unstarted(
            session,
            fence,
            job,
            cancelled,
            why=WINDOW_CLOSED,
            how="cancelled while running",
            now=utcnow(),
            outcome=Outcome.CANCELLED_RUNNING,
        )
    job = _job(engine, batch_id)
    assert (job.state, job.actual_usd) == (S.RETRY_WAIT, Decimal("0.25"))


def test_a_job_sent_again_counts_its_earlier_attempts_bill_in_the_day(engine: Engine) -> None:
    settings = settings_for("http://127.0.0.1:9", KEY, max_outstanding=10, daily_budget_usd=Decimal("0.70"))
    resent = add_batch(engine, "billed-then-resent", [WAN], est_usd=Decimal("0.25"))
    _billed_and_back(engine, resent)
    assert _today(engine) == (Decimal("0.25"), Decimal("0.25"))  # billed today, waiting

    # Sent again the same UTC day: $0.25 billed + $0.25 for the new attempt, in every state
    # fal may hold it in — as its batch counts it.
    job_id = _job(engine, resent).id
    assert dispatch(make_runtime(engine, settings, batch_ids=frozenset({resent}))) == [job_id]
    assert _job(engine, resent).state == S.SUBMITTING
    assert _today(engine) == (Decimal("0.50"), Decimal("0.50"))
    with db.session_scope(engine) as session:
        job = store.get_job(session, job_id)
        fence = _mark_sent(session, store.Fence.of(job, "test"), 2, running=False)
    assert _today(engine) == (Decimal("0.50"), Decimal("0.50"))  # queued
    with db.session_scope(engine) as session:
        assert store.mark_running(session, fence, next_poll_at=utcnow())
    assert _today(engine) == (Decimal("0.50"), Decimal("0.50"))  # running
    with db.read_scope(engine) as session:
        assert store.batch_committed_usd(session, resent) == Decimal("0.50")
        assert store.batch_money(session, resent).committed_usd == Decimal("0.50")

    # $0.50 of today's $0.70 is committed: another $0.25 job would make $0.75.
    other = add_batch(engine, "one-too-many", [WAN], est_usd=Decimal("0.25"))
    assert dispatch(make_runtime(engine, settings, batch_ids=frozenset({other}))) == []
    job = _job(engine, other)
    assert (job.state, job.error_type) == (S.CANCELLED, DAILY_CAP_ERROR)
    assert job.error == (
        "budget: submitting would commit $0.75 of today's $0.70 cap "
        "(WANBATCH_DAILY_BUDGET_USD; $0.50 of it by other batches: billed-then-resent)"
    )


def test_in_one_round_a_resent_job_keeps_its_bill_in_the_day(engine: Engine) -> None:
    """The round's own running total (dispatch's ``_Committed``) counts the resent job as the
    store does: the job claimed after it does not fit either."""
    settings = settings_for("http://127.0.0.1:9", KEY, max_outstanding=10, daily_budget_usd=Decimal("0.70"))
    resent = add_batch(engine, "billed-then-resent", [WAN], est_usd=Decimal("0.25"))
    _billed_and_back(engine, resent)
    other = add_batch(engine, "same-round", [WAN], est_usd=Decimal("0.25"))
    sent = dispatch(make_runtime(engine, settings, batch_ids=frozenset({resent, other})))
    assert sent == [_job(engine, resent).id]
    job = _job(engine, other)
    assert (job.state, job.error_type) == (S.CANCELLED, DAILY_CAP_ERROR)
    # Whose the day's money is, read in the round after the resend: its bill and its estimate.
    assert job.error == (
        "budget: submitting would commit $0.75 of today's $0.70 cap "
        "(WANBATCH_DAILY_BUDGET_USD; $0.50 of it by other batches: billed-then-resent)"
    )
    assert _today(engine) == (Decimal("0.50"), Decimal("0.50"))


def test_a_job_billed_on_an_earlier_day_is_refused_when_its_bill_and_estimate_cross_the_days_cap(
    engine: Engine,
) -> None:
    """The day counts a job at fal by the day it was last sent, its earlier bills with it: one
    billed yesterday and sent again today adds both to today. The refusal checks that whole
    amount, so sending it never takes today's committed sum past the cap (it checked the
    estimate alone: $0.25 of $0.40 fitted, and the day then stood at $0.50)."""
    settings = settings_for("http://127.0.0.1:9", KEY, max_outstanding=10, daily_budget_usd=Decimal("0.40"))
    resent = add_batch(engine, "billed-yesterday", [WAN], est_usd=Decimal("0.25"))
    _billed_and_back(engine, resent)
    with db.session_scope(engine) as session:  # that attempt was sent (and billed) yesterday
        job = session.get(Job, _job(engine, resent).id)
        assert job is not None
        assert job.submitted_at is not None
        job.submitted_at -= timedelta(days=1)
    assert _today(engine) == (Decimal(0), Decimal(0))

    assert dispatch(make_runtime(engine, settings, batch_ids=frozenset({resent}))) == []
    job = _job(engine, resent)
    assert (job.state, job.error_type) == (S.CANCELLED, DAILY_CAP_ERROR)
    assert job.error == (
        "budget: submitting would commit $0.50 of today's $0.40 cap (WANBATCH_DAILY_BUDGET_USD)"
    )
    assert _today(engine)[0] <= Decimal("0.40")
