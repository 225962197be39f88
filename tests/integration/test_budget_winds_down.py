"""A budget cap reached ends every unsent job that cannot fit in one dispatch round, on both databases.

Dispatch used to cancel a capped batch's jobs only as it claimed them: as many per round as the
outstanding cap had room for (ten by default), with the tick idling in between (nothing was
sent), so a 50,000-job batch took hours to end. The round that meets the cap now ends, in one
set-based move, every unsent job of the batch whose estimate is above the room left — with the
very words, fields, history and totals of a job refused when claimed — while a cheaper job that
still fits stays pending and is sent.
"""

from __future__ import annotations

import logging
import threading
from decimal import Decimal

import pytest
from sqlalchemy import Engine, func, select, update

from jobs import db, store
from jobs.models import Job, JobEvent
from jobs.money import BATCH_CAP_ERROR, DAILY_CAP_ERROR
from jobs.states import JobState
from tests.sample_inputs import INPUTS
from tests.step_runtime import add_batch, job_ids, job_states, make_runtime, settings_for
from worker.conductor import Conductor
from worker.steps import dispatch

S = JobState
KEY = "budget-winds-down-key"
WAN = ("fal-ai/wan-22", INPUTS["fal-ai/wan-22"])


def _cancelled(engine: Engine, batch_id: str) -> list[Job]:
    with db.read_scope(engine) as session:
        jobs = [j for j in store.jobs_of_batch(session, batch_id) if j.state == S.CANCELLED]
        for job in jobs:
            session.expunge(job)
        return jobs


def _events_into_cancelled(engine: Engine, batch_id: str) -> list[tuple[str, str | None, str | None]]:
    """(job id, reason, worker) of every history entry into ``cancelled`` of the batch's jobs."""
    with db.read_scope(engine) as session:
        rows = session.execute(
            select(JobEvent.job_id, JobEvent.reason, JobEvent.worker)
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.batch_id == batch_id, JobEvent.to_state == S.CANCELLED)
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def _money_consistent(engine: Engine, batch_id: str) -> None:
    """The running totals the caps read equal the sums over every job."""
    with db.read_scope(engine) as session:
        money = store.batch_money(session, batch_id)
        assert store.batch_committed_usd(session, batch_id) == money.committed_usd
        assert store.batch_spent_usd(session, batch_id) == money.spent_usd


def test_one_round_ends_every_job_the_batch_cap_cannot_fit(engine: Engine) -> None:
    batch_id = add_batch(engine, "capped-500", [WAN] * 500, est_usd=Decimal("0.25"))
    with db.session_scope(engine) as session:
        store.set_batch_budget(session, batch_id, Decimal("0.50"))  # two jobs fit
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY), batch_ids=frozenset({batch_id}))
    assert rt.settings.max_outstanding == 10  # a round claims ten at most
    sent = dispatch(rt)  # ONE round
    assert sent == job_ids(engine, batch_id)[:2]
    assert job_states(engine, batch_id) == {"submitting": 2, "cancelled": 498}
    assert rt.budget_cancelled == 498

    cancelled = _cancelled(engine, batch_id)
    words = "budget: submitting would commit $0.75 of the batch's $0.50 cap"
    assert {(j.error, j.error_type) for j in cancelled} == {(words, BATCH_CAP_ERROR)}
    assert all(j.finished_at is not None and j.lease_owner is None for j in cancelled)
    assert {(j.actual_usd, j.actual_billing_units) for j in cancelled} == {(Decimal(0), Decimal(0))}
    assert {j.version for j in cancelled} == {1}  # stored at 0, one move
    # One history entry each, as mark_cancelled writes for a job refused when claimed.
    events = _events_into_cancelled(engine, batch_id)
    assert sorted(e[0] for e in events) == sorted(j.id for j in cancelled)
    assert {e[1:] for e in events} == {("budget", rt.owner)}
    with db.read_scope(engine) as session:
        assert store.count_cancelled(session, batch_id, BATCH_CAP_ERROR) == 498
        assert store.batch_money(session, batch_id).committed_usd == Decimal("0.50")
    _money_consistent(engine, batch_id)

    # Nothing is left to do: the next round neither sends nor cancels.
    assert dispatch(rt) == []
    assert rt.budget_cancelled == 498


def test_a_cheaper_job_that_still_fits_is_still_sent(engine: Engine) -> None:
    """Twenty $1.00 jobs, then five $0.10 ones, a $1.25 cap: the first round (room for two)
    sends one $1.00 job and refuses the next, and ends every $1.00 job with it — but none of
    the $0.10 ones, which fit the $0.25 left; the next round sends two of them and ends the rest."""
    batch_id = add_batch(engine, "mixed", [WAN] * 25, est_usd=Decimal("1.00"))
    ids = job_ids(engine, batch_id)
    cheap = ids[20:]
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.id.in_(cheap)).values(est_usd=Decimal("0.10")))
        store.set_batch_budget(session, batch_id, Decimal("1.25"))
    settings = settings_for("http://127.0.0.1:9", KEY, max_outstanding=2)
    rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
    assert dispatch(rt) == [ids[0]]
    assert job_states(engine, batch_id) == {"submitting": 1, "cancelled": 19, "pending": 5}
    words = "budget: submitting would commit $2.00 of the batch's $1.25 cap"
    assert {(j.id, j.error) for j in _cancelled(engine, batch_id)} == {(i, words) for i in ids[1:20]}
    _money_consistent(engine, batch_id)

    rt = make_runtime(
        engine, settings.model_copy(update={"max_outstanding": 10}), batch_ids=frozenset({batch_id})
    )
    assert dispatch(rt) == cheap[:2]  # $1.10, $1.20: within the cap
    assert job_states(engine, batch_id) == {"submitting": 3, "cancelled": 22}
    late = {j.id: j.error for j in _cancelled(engine, batch_id) if j.id in cheap}
    assert late == dict.fromkeys(cheap[2:], "budget: submitting would commit $1.30 of the batch's $1.25 cap")
    with db.read_scope(engine) as session:
        assert store.batch_money(session, batch_id).committed_usd == Decimal("1.20")
    _money_consistent(engine, batch_id)


def test_one_round_ends_every_job_the_daily_cap_cannot_fit_of_that_batch_only(engine: Engine) -> None:
    batch_id = add_batch(engine, "daily-300", [WAN] * 300, est_usd=Decimal("0.25"))
    elsewhere = add_batch(engine, "not-run", [WAN] * 20, est_usd=Decimal("0.25"))
    settings = settings_for("http://127.0.0.1:9", KEY, daily_budget_usd=Decimal("0.50"))
    rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
    assert len(dispatch(rt)) == 2
    assert job_states(engine, batch_id) == {"submitting": 2, "cancelled": 298}
    words = "budget: submitting would commit $0.75 of today's $0.50 cap (WANBATCH_DAILY_BUDGET_USD)"
    assert {(j.error, j.error_type) for j in _cancelled(engine, batch_id)} == {(words, DAILY_CAP_ERROR)}
    assert job_states(engine, elsewhere) == {"pending": 20}  # another batch this run does not send
    with db.read_scope(engine) as session:
        assert store.count_cancelled(session, batch_id, DAILY_CAP_ERROR) == 298
    _money_consistent(engine, batch_id)


def test_a_job_a_twin_may_give_its_output_is_left_to_its_claim(engine: Engine) -> None:
    """With ``reuse_outputs`` a job that has a succeeded twin may cost nothing: it is not ended
    with the others, but decided when dispatch claims it."""
    earlier = add_batch(engine, "earlier", [WAN] * 10, est_usd=Decimal("0.25"))
    twin = job_ids(engine, earlier)[9]  # same key as the new batch's tenth job
    with db.session_scope(engine) as session:
        session.execute(
            update(Job)
            .where(Job.id == twin)
            .values(state=S.SUCCEEDED, output_path="/videos/twin.mp4", output_sha256="0" * 64)
        )
    batch_id = add_batch(engine, "reusing", [WAN] * 10, est_usd=Decimal("0.25"))
    with db.session_scope(engine) as session:
        store.set_batch_reuse_outputs(session, batch_id, True)
        store.set_batch_budget(session, batch_id, Decimal("0.25"))
    rt = make_runtime(
        engine, settings_for("http://127.0.0.1:9", KEY, max_outstanding=2), batch_ids=frozenset({batch_id})
    )
    ids = job_ids(engine, batch_id)
    assert dispatch(rt) == [ids[0]]
    assert job_states(engine, batch_id) == {"submitting": 1, "cancelled": 8, "pending": 1}
    with db.read_scope(engine) as session:
        assert store.get_job(session, ids[9]).state == S.PENDING


def test_a_tick_that_only_cancels_for_the_budget_is_not_idle(engine: Engine) -> None:
    """Nothing fits: the tick sends nothing, yet it ended the batch's 500 jobs — work, so the
    conductor neither slows down nor waits for the next tick to dispatch again."""
    batch_id = add_batch(engine, "nothing-fits", [WAN] * 500, est_usd=Decimal("0.25"))
    with db.session_scope(engine) as session:
        store.set_batch_budget(session, batch_id, Decimal("0.10"))
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY), batch_ids=frozenset({batch_id}))
    conductor = Conductor(rt, stream=False)
    assert conductor._tick(threading.Event()) is False  # not idle
    assert job_states(engine, batch_id) == {"cancelled": 500}
    assert conductor._redispatch_at() is not None  # look again shortly
    assert conductor._redispatch_at() is None  # only after rounds that cancelled
    with db.read_scope(engine) as session:
        total = session.scalar(
            select(func.count()).select_from(JobEvent).join(Job).where(Job.batch_id == batch_id)
        )
    assert total == 500  # one history entry each, no more
    _money_consistent(engine, batch_id)


def _wound_down(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ``dispatch.budget_cancelled`` warnings logged."""
    return [
        r.getMessage()
        for r in caplog.records
        if getattr(r, "event", None) == "dispatch.budget_cancelled" and r.levelno == logging.WARNING
    ]


# The one line for the jobs a round ends together blamed "its budget" whatever cap ended them: a
# batch with no budget at all, wound down by WANBATCH_DAILY_BUDGET_USD, was said to be over its
# own budget. It names the cap: the batch's, today's, or both (with how many each). A round
# claims three: two are sent, the third refused (a line of its own), the other seven ended.
URL = "http://127.0.0.1:9"


def test_the_wind_down_warning_names_today_s_cap_for_a_batch_without_budget(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    batch_id = add_batch(engine, "no-budget", [WAN] * 10, est_usd=Decimal("0.25"))
    settings = settings_for(URL, KEY, max_outstanding=3, daily_budget_usd=Decimal("0.50"))
    rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
    with caplog.at_level(logging.WARNING, logger="worker.steps.dispatch"):
        assert len(dispatch(rt)) == 2
    assert _wound_down(caplog) == [
        f"batch {batch_id}: 7 unsent job(s) cannot fit today's cap "
        "($0.50, WANBATCH_DAILY_BUDGET_USD): cancelled"
    ]


def test_the_wind_down_warning_names_the_batch_s_budget(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    batch_id = add_batch(engine, "own-budget", [WAN] * 10, est_usd=Decimal("0.25"))
    with db.session_scope(engine) as session:
        store.set_batch_budget(session, batch_id, Decimal("0.50"))
    rt = make_runtime(engine, settings_for(URL, KEY, max_outstanding=3), batch_ids=frozenset({batch_id}))
    with caplog.at_level(logging.WARNING, logger="worker.steps.dispatch"):
        assert len(dispatch(rt)) == 2
    assert _wound_down(caplog) == [
        f"batch {batch_id}: 7 unsent job(s) cannot fit its budget ($0.50): cancelled"
    ]


def test_the_wind_down_warning_names_both_caps_when_both_end_jobs(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Five $1.00 jobs, then five $0.30 ones; a $1.50 budget and a $1.20 day. The first $1.00 job
    is sent, the second refused by the batch's cap; the other $1.00 ones cannot fit the $0.50 its
    budget has left, the $0.30 ones the $0.20 left of today's cap."""
    batch_id = add_batch(engine, "both-caps", [WAN] * 10, est_usd=Decimal("1.00"))
    ids = job_ids(engine, batch_id)
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.id.in_(ids[5:])).values(est_usd=Decimal("0.30")))
        store.set_batch_budget(session, batch_id, Decimal("1.50"))
    settings = settings_for(URL, KEY, max_outstanding=2, daily_budget_usd=Decimal("1.20"))
    rt = make_runtime(engine, settings, batch_ids=frozenset({batch_id}))
    with caplog.at_level(logging.WARNING, logger="worker.steps.dispatch"):
        assert dispatch(rt) == [ids[0]]
    assert job_states(engine, batch_id) == {"submitting": 1, "cancelled": 9}
    assert _wound_down(caplog) == [
        f"batch {batch_id}: 8 unsent job(s) cannot fit its budget ($1.50) or today's cap "
        "($1.20, WANBATCH_DAILY_BUDGET_USD): cancelled (3 over its budget, 5 over today's cap)"
    ]
