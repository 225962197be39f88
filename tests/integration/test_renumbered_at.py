"""``jobs.renumbered_at``, on both dialects: every statement of :func:`jobs.store.resubmit_jobs`
that gives a stored job another item number stamps it (its output files' names hold the
number: the download step looks under the old one only for such a job), and nothing else does."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy.orm import Session

from jobs import store
from jobs.models import utcnow


def _job(i: int, item: int, variant: int = 0) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=item,
        endpoint="fal-ai/wan-22",
        input={"prompt": f"job {i}"},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
        variant=variant,
    )


def _stamps(session: Session, batch_id: str) -> dict[int, tuple[int, int, bool]]:
    session.expire_all()  # written with Core
    return {
        int(job.job_key, 16): (job.item_index, job.variant, job.renumbered_at is not None)
        for job in store.jobs_of_batch(session, batch_id)
    }


def test_a_resubmit_stamps_the_jobs_whose_item_number_it_changes(session: Session) -> None:
    batch, _ = store.get_or_create_batch(
        session, name="renumbered", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(session, batch.id, [_job(0, 0), _job(1, 1), _job(2, 2), _job(3, 3)])
    session.commit()
    assert _stamps(session, batch.id) == {i: (i, 0, False) for i in range(4)}

    before = utcnow()
    # Job 0 takes another variant of its item, job 1 stays, an item (job 4) is inserted above job
    # 2, and job 3 is no longer in the manifest: numbered after its 4 items.
    again = [_job(0, 0, variant=1), _job(1, 1), _job(4, 2), _job(2, 3)]
    moved = store.resubmit_jobs(session, batch.id, again, lambda: 4)
    session.commit()
    assert (moved.added, moved.renumbered, moved.not_in_manifest) == (1, 2, 1)
    assert _stamps(session, batch.id) == {
        0: (0, 1, False),  # its files keep their name: only the item number is in it
        1: (1, 0, False),
        2: (3, 0, True),
        3: (4, 0, True),
        4: (2, 0, False),  # new
    }
    stamped = {int(j.job_key, 16): j.renumbered_at for j in store.jobs_of_batch(session, batch.id)}
    for i in (2, 3):
        at = stamped[i]
        assert at is not None
        assert before <= at <= utcnow()  # stamped by this resubmit

    # The same manifest again changes no number: nothing is stamped again.
    store.resubmit_jobs(session, batch.id, again, lambda: 4)
    session.commit()
    session.expire_all()
    assert {int(j.job_key, 16): j.renumbered_at for j in store.jobs_of_batch(session, batch.id)} == stamped
