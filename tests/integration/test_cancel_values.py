"""A never-sent job ends alike whichever set-based cancel ends it, on both dialects.

``wanbatch cancel`` (:func:`jobs.store.cancel_unsent`), a budget's cancel
(:func:`jobs.store.cancel_unsent_over`) and a resubmit's drop of a job its manifest no longer has
(``jobs.store.creating._drop_never_sent``) each built the columns they write by hand; they now
share one builder (``jobs.store.unsent._cancel_values``). Held here: the three end the same
never-sent job — waiting for a retry, its lease run out — with the same columns, but for the
words of ``error`` and ``error_type``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from jobs import store
from jobs.models import NOT_IN_MANIFEST, Job
from jobs.states import JobState as S

BEFORE = datetime(2026, 12, 1, tzinfo=UTC)


def _job(name: str) -> store.NewJob:
    return store.NewJob(
        key=name.encode().hex().ljust(64, "0"),
        item_index=0,
        endpoint="fal-ai/wan-22",
        input={"prompt": name},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
    )


def _waiting_job(session: Session, name: str) -> str:
    """A batch of one job never sent, waiting for a retry, whose lease ran out: its batch's id."""
    batch, _ = store.get_or_create_batch(
        session, name=name, manifest_path=f"/{name}.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(session, batch.id, [_job(name)])
    session.execute(
        update(Job)
        .where(Job.batch_id == batch.id)
        .values(
            state=S.RETRY_WAIT,
            next_attempt_at=BEFORE + timedelta(hours=1),
            lease_owner="gone:1:",
            lease_expires_at=BEFORE,
        )
    )
    session.commit()
    return batch.id


def _ended(session: Session, batch_id: str) -> dict[str, Any]:
    session.expire_all()  # written with Core
    (job,) = store.jobs_of_batch(session, batch_id, states=[S.CANCELLED])
    return {
        "state": job.state,
        "version": job.version,
        "finished": job.finished_at is not None,
        "next_attempt_at": job.next_attempt_at,
        "lease_owner": job.lease_owner,
        "lease_expires_at": job.lease_expires_at,
        "actual_usd": job.actual_usd,
        "actual_billing_units": job.actual_billing_units,
    }


def test_a_never_sent_job_ends_alike_by_a_cancel_a_budget_and_a_resubmit(session: Session) -> None:
    cancelled, over_budget, dropped = (_waiting_job(session, n) for n in ("cancelled", "over", "dropped"))
    session.expire_all()
    version = {
        job.version for b in (cancelled, over_budget, dropped) for job in store.jobs_of_batch(session, b)
    }
    assert len(version) == 1

    store.cancel_unsent(
        session, [cancelled], reason="batch cancelled", error="cancelled by user", error_type="cancelled"
    )
    store.cancel_unsent_over(
        session,
        over_budget,
        over_usd=Decimal("0.10"),
        error_for=lambda usd: f"over budget: {usd}",
        error_type="budget",
        reason="budget",
        worker=None,
        now=BEFORE + timedelta(minutes=1),
        keep_reusable=False,
    )
    store.resubmit_jobs(session, dropped, [_job("another")], lambda: 1)  # the manifest edited
    session.commit()

    ended = {batch_id: _ended(session, batch_id) for batch_id in (cancelled, over_budget, dropped)}
    assert ended[cancelled] == {
        "state": S.CANCELLED,
        "version": version.pop() + 1,
        "finished": True,
        "next_attempt_at": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "actual_usd": Decimal(0),
        "actual_billing_units": Decimal(0),
    }
    assert ended[over_budget] == ended[cancelled]
    assert ended[dropped] == ended[cancelled]
    errors = {}
    for batch_id in (cancelled, over_budget, dropped):
        (job,) = store.jobs_of_batch(session, batch_id, states=[S.CANCELLED])
        errors[batch_id] = job.error_type
    assert errors == {cancelled: "cancelled", over_budget: "budget", dropped: NOT_IN_MANIFEST}
