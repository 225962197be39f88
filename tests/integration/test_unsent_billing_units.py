"""A job that ends without ever being sent is billed 0 USD and 0 billing units, not 0 and NULL.

Export audit (session 34): jobs cancelled before they were sent (a budget, ``wanbatch cancel``)
exported ``cost_usd`` 0 beside ``billing_units`` null in every format, where every other
finished job (a reused one, a failed 422) has both. The store wrote ``actual_usd`` 0 on every
way a job ends unsent (a move out of an unsent state, :func:`store.fail_unsent`,
:func:`store.cancel_unsent`) but never ``actual_billing_units``. A job sent before keeps what
its attempts were billed, units included.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.models import Job, utcnow
from jobs.states import JobState

S = JobState


def _jobs(engine: Engine, plan: list[tuple[JobState, bool]]) -> tuple[str, list[str]]:
    """A batch of one job per ``(state, sent before)``; its id and its jobs' ids, in that order.
    A job sent before was billed $0.10 (0.5 units) by that attempt."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name="unsent", manifest_path="unsent.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(
            session,
            batch.id,
            [
                store.NewJob(
                    key=f"{i:064x}",
                    item_index=i,
                    endpoint="fal-ai/wan-22",
                    input={"prompt": f"take {i}"},
                    est_billing_units=Decimal(1),
                    est_usd=Decimal("0.2"),
                )
                for i in range(len(plan))
            ],
        )
        ids = [job.id for job in store.jobs_of_batch(session, batch.id)]
        for job_id, (state, sent) in zip(ids, plan, strict=True):
            values: dict[str, object] = {"state": state}
            if sent:
                values |= {
                    "attempts": 1,
                    "submitted_at": utcnow(),
                    "actual_usd": Decimal("0.1"),
                    "actual_billing_units": Decimal("0.5"),
                }
            session.execute(update(Job).where(Job.id == job_id).values(**values))
        return batch.id, ids


def _billed(session: Session, job_id: str) -> tuple[Decimal | None, Decimal | None]:
    session.expire_all()
    job = session.get(Job, job_id)
    assert job is not None
    return job.actual_usd, job.actual_billing_units


def test_every_way_of_ending_unsent_bills_zero_units_beside_zero_usd(
    engine: Engine, session: Session
) -> None:
    _, (budget, retried, submitting, cancelled, resend) = _jobs(
        engine,
        [
            (S.PENDING, False),  # a budget stops it: a move out of an unsent state
            (S.RETRY_WAIT, True),  # the same move, for a job its first attempt was billed for
            (S.SUBMITTING, False),  # its input file changed before its POST left
            (S.PENDING, False),  # `wanbatch cancel`
            (S.RETRY_WAIT, True),  # `wanbatch cancel`, sent before
        ],
    )
    for job_id in (budget, retried):
        job = session.get(Job, job_id)
        assert job is not None
        fence = store.Fence.of(job)
        assert store.mark_cancelled(session, fence, reason="budget", error="budget", error_type="budget")
    job = session.get(Job, submitting)
    assert job is not None
    fence = store.Fence.of(job)
    assert store.fail_unsent(session, fence, error="input file changed", error_type="input_file")
    store.cancel_unsent(
        session, [job.batch_id], reason="batch cancelled", error="cancelled by user", error_type="cancelled"
    )
    session.commit()

    for job_id in (budget, submitting, cancelled):
        assert _billed(session, job_id) == (Decimal(0), Decimal(0))
    for job_id in (retried, resend):  # what the earlier attempt was billed stays
        assert _billed(session, job_id) == (Decimal("0.1"), Decimal("0.5"))
