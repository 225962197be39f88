"""Jobs a batch's budget cap cancelled before ever sending them are ``pending`` again once the
cap is raised (:func:`jobs.store.revive_budget_cancelled`), on both dialects.

A manifest resubmitted with a higher ``budget.max_usd`` said the new cap "applies to every job
not yet sent", yet the jobs the old cap had cancelled unsent stayed cancelled and nothing was
sent; ``rerun --failed-only`` then gave them a fresh cap on top of the spent one. Only those
jobs come back: a job sent before, one another cause ended (the day's cap, a deadline, a
cancel), one its manifest no longer has, or one a rerun repeats already stays as it is."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs import store
from jobs.models import Job, JobEvent
from jobs.money import BATCH_CAP_ERROR, DAILY_CAP_ERROR
from jobs.states import JobState as S


def _job(i: int) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=i,
        endpoint="fal-ai/wan-22",
        input={"prompt": f"job {i}"},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.20"),
    )


SENT = datetime(2026, 12, 1, tzinfo=UTC)
ENDED = {"state": S.CANCELLED, "finished_at": SENT, "actual_usd": Decimal(0), "error": "ended"}

#: How each job stands before the cap is raised.
STANDING: dict[int, dict[str, Any]] = {
    0: {**ENDED, "error_type": BATCH_CAP_ERROR},  # the cap cancelled it unsent: revived
    1: {**ENDED, "error_type": BATCH_CAP_ERROR},  # likewise
    2: {**ENDED, "error_type": BATCH_CAP_ERROR, "attempts": 1, "submitted_at": SENT, "request_id": "r"},
    3: {**ENDED, "error_type": DAILY_CAP_ERROR},  # the day's cap: not this batch's
    4: {**ENDED, "error_type": "deadline"},
    5: {**ENDED, "error_type": "cancelled"},  # `wanbatch cancel`
    6: {**ENDED, "error_type": BATCH_CAP_ERROR, "not_in_manifest": True},
    7: {**ENDED, "error_type": BATCH_CAP_ERROR},  # a rerun is rendering it (below)
    9: {**ENDED, "error_type": BATCH_CAP_ERROR},  # its rerun was cancelled too: revived
    8: {"state": S.SUCCEEDED, "actual_usd": Decimal("0.20")},
}


def test_raising_the_cap_revives_only_the_jobs_it_cancelled_unsent(session: Session) -> None:
    batch, _ = store.get_or_create_batch(
        session, name="raise", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=Decimal(1)
    )
    store.add_jobs(session, batch.id, [_job(i) for i in STANDING])
    for i, values in STANDING.items():
        session.execute(update(Job).where(Job.job_key == f"{i:064x}").values(**values))
    session.commit()
    rerun, _ = store.get_or_create_batch(
        session,
        name="raise-rerun-1",
        manifest_path="/m.yaml",
        manifest_sha256="0" * 64,
        budget_max_usd=None,
        parent_batch_id=batch.id,
    )
    copies = []
    for i in (7, 9):
        repeated = session.scalars(select(Job).where(Job.job_key == f"{i:064x}")).one()
        copies.append(replace(_job(i), key=f"{i:064x}"[::-1], rerun_of=repeated.id))
    store.add_jobs(session, rerun.id, copies)
    cancelled_copy = update(Job).where(Job.job_key == f"{9:064x}"[::-1])
    session.execute(cancelled_copy.values(**ENDED, error_type="cancelled"))
    session.commit()
    before = {int(j.job_key, 16): (j.state, j.version) for j in store.jobs_of_batch(session, batch.id)}
    committed = store.batch_committed_usd(session, batch.id), store.batch_money(session, batch.id).spent_usd

    revived = store.revive_budget_cancelled(session, batch.id)
    session.commit()

    assert revived == 3
    session.expire_all()
    jobs = {int(j.job_key, 16): j for j in store.jobs_of_batch(session, batch.id)}
    for i in (0, 1, 9):
        job = jobs[i]
        assert job.state == S.PENDING
        assert (job.error, job.error_type, job.finished_at, job.actual_usd) == (None,) * 4
        assert job.version == before[i][1] + 1
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == job.id)).all()
        assert [(e.from_state, e.to_state) for e in events][-1:] == [(S.CANCELLED, S.PENDING)]
    for i in (2, 3, 4, 5, 6, 7, 8):
        assert (jobs[i].state, jobs[i].version) == before[i], i
    # Nothing of them was billed: what the batch has committed is what it had.
    after = store.batch_committed_usd(session, batch.id), store.batch_money(session, batch.id).spent_usd
    assert after == committed
    assert store.revive_budget_cancelled(session, batch.id) == 0  # nothing left to revive
