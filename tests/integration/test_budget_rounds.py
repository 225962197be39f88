"""Budget caps within one dispatch round, read once per round (issue #11), on both databases.

Dispatch used to sum a batch's money and the day's money again for every job it claimed; now it
reads each once per round and adds every estimate it reserves. These tests pin that the caps
still stop at exactly the same job, with the same words, and that the running totals equal what
the store computes afresh.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from sqlalchemy import Engine, update

from jobs import db, store
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.steps import dispatch
from worker.steps.dispatch import _Committed, _RoundBatches

WAN = ("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])


def errors_of(engine: Engine, batch_id: str) -> dict[str, list[str | None]]:
    """Per state, the error of each job in it (item order)."""
    found: dict[str, list[str | None]] = {}
    with db.session_scope(engine) as session:
        for job in store.jobs_of_batch(session, batch_id):
            found.setdefault(job.state.value, []).append(job.error)
    return found


def test_one_round_stops_at_the_batch_cap_then_at_the_daily_cap(engine: Engine) -> None:
    settings = settings_for(
        "http://127.0.0.1:9", "budget-key", max_outstanding=50, daily_budget_usd=Decimal("1.50")
    )
    capped = add_batch(engine, "capped", [WAN] * 6, est_usd=Decimal("0.25"))
    with db.session_scope(engine) as session:
        store.set_batch_budget(session, capped, Decimal("1.00"))
    assert len(dispatch(make_runtime(engine, settings, batch_ids=frozenset({capped})))) == 4
    batch_refusal = "budget: submitting would commit $1.25 of the batch's $1.00 cap"
    assert errors_of(engine, capped) == {"submitting": [None] * 4, "cancelled": [batch_refusal] * 2}

    # $1.00 of today's $1.50 is committed (reserved) by the first batch: two more fit.
    other = add_batch(engine, "other", [WAN] * 4, est_usd=Decimal("0.25"))
    assert len(dispatch(make_runtime(engine, settings, batch_ids=frozenset({other})))) == 2
    daily_refusal = (  # whose the rest of the day's money is: the first batch's
        "budget: submitting would commit $1.75 of today's $1.50 cap "
        "(WANBATCH_DAILY_BUDGET_USD; $1.00 of it by other batches: capped)"
    )
    assert errors_of(engine, other) == {"submitting": [None] * 2, "cancelled": [daily_refusal] * 2}


def test_the_rounds_running_totals_equal_the_stores(engine: Engine) -> None:
    now = utcnow()
    since = now.replace(hour=0, minute=0, second=0, microsecond=0)
    batch_id = add_batch(engine, "totals", [WAN] * 4, est_usd=Decimal("0.30"))
    first, second, third, fourth = job_ids(engine, batch_id)
    with db.session_scope(engine) as session:
        store.set_batch_budget(session, batch_id, Decimal("100"))
        # Earlier attempts that were billed: one submitted today, one before today.
        for job_id, submitted_at in (
            (first, now),
            (second, since - timedelta(hours=1)),
        ):
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(state=JobState.RETRY_WAIT, actual_usd=Decimal("0.125"), submitted_at=submitted_at)
            )
        session.execute(update(Job).where(Job.id == third).values(state=JobState.RETRY_WAIT))
        # Sent yesterday, its answer lost: resent, what it may have cost counts again at fal.
        session.execute(
            update(Job)
            .where(Job.id == fourth)
            .values(
                state=JobState.RETRY_WAIT,
                ambiguous_usd=Decimal("0.5"),
                submitted_at=since - timedelta(hours=2),
            )
        )
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", "budget-key"))
    with db.session_scope(engine) as session:
        committed = _Committed(session, _RoundBatches(session, ()), now, Decimal("100"))
        before = (committed.batch(batch_id)[1], committed.today())
        assert before == (Decimal("0.75"), Decimal("0.125"))  # billed money only, today's once
        jobs = store.claim_jobs(
            session,
            states=[JobState.PENDING, JobState.RETRY_WAIT],
            limit=10,
            now=now,
            owner=rt.owner,
            lease_seconds=60,
        )
        assert len(jobs) == 4
        for job in jobs:
            assert store.mark_submitting(
                session, rt.fence(job), attempt=job.attempts + 1, api_key_id="k", lease_expires_at=now
            )
            committed.add(job)
            assert committed.batch(batch_id)[1] == store.batch_money(session, batch_id).committed_usd
            assert committed.today() == store.committed_usd_since(session, committed.since)
    assert committed.batch(batch_id) == (Decimal("100"), Decimal("0.75") + 4 * Decimal("0.30"))
    # Each job at fal again counts what its earlier attempts were (or may have been) billed
    # beside its estimate, as the batch counts it and the store counts it: today's billed
    # attempt, yesterday's, and yesterday's lost answer alike.
    assert committed.today() == 4 * Decimal("0.30") + Decimal("0.5") + 2 * Decimal("0.125")
