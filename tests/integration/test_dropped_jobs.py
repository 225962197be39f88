"""Jobs an edited manifest no longer has, on both dialects (:func:`jobs.store.resubmit_jobs`).

Those never sent (``pending``/``retry_wait``, no attempt, nothing recorded of a POST) end
``cancelled`` (``not_in_manifest``) in the resubmit's own transaction: they used to stay pending
and be sent and billed by the next run (a prompt's typo, fixed, was paid for in both spellings).
Those that may have reached fal stay as they are. Every job the manifest left out is marked
(``not_in_manifest``), every job it has unmarked; the manifest bringing a dropped job back makes
that very row ``pending`` again. A dropped job's estimate is no longer counted."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from jobs import batches, db, listing, store
from jobs.models import NOT_IN_MANIFEST, Job, JobEvent
from jobs.rerun import NothingToRerun, rerun_batch
from jobs.settings import Settings
from jobs.states import JobState as S


def _job(i: int, item: int) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=item,
        endpoint="fal-ai/wan-22",
        input={"prompt": f"job {i}"},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
    )


SENT = datetime(2026, 12, 1, tzinfo=UTC)

#: How each job of the batch stands before the resubmit that leaves out all but job 0.
STANDING: dict[int, dict[str, Any]] = {
    1: {"state": S.QUEUED, "attempts": 1, "submitted_at": SENT, "request_id": "req-1"},  # at fal
    2: {"state": S.PENDING, "attempts": 1, "submitted_at": SENT},  # sent before (a window's end)
    3: {"state": S.RETRY_WAIT},  # never sent
    4: {"state": S.PENDING},  # never sent
    5: {"state": S.SUBMITTING, "attempts": 1},  # claimed: its POST may be on its way
    6: {"state": S.RETRY_WAIT, "rate_limited_submits": 1},  # a POST went out (fal refused it: 429)
}


def _rows(session: Session, batch_id: str) -> dict[int, Job]:
    session.expire_all()  # written with Core
    return {int(j.job_key, 16): j for j in store.jobs_of_batch(session, batch_id)}


def _estimates(session: Session, batch_id: str) -> tuple[Decimal, Decimal, Decimal]:
    return (
        store.batch_money(session, batch_id).estimated_usd,
        store.batch_estimated_usd(session, batch_id),
        listing.batch_summary(session, batch_id).all.estimated_usd,
    )


def test_a_resubmit_cancels_the_left_out_jobs_never_sent_and_keeps_the_others(session: Session) -> None:
    batch, _ = store.get_or_create_batch(
        session, name="dropped", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(session, batch.id, [_job(i, i) for i in range(7)])
    for i, values in STANDING.items():
        session.execute(update(Job).where(Job.job_key == f"{i:064x}").values(**values))
    session.commit()
    before = {i: (j.state, j.version) for i, j in _rows(session, batch.id).items()}

    done = store.resubmit_jobs(session, batch.id, [_job(0, 0)], lambda: 1)
    session.commit()

    assert (done.not_in_manifest, done.dropped, done.restored) == (6, 2, 0)
    jobs = _rows(session, batch.id)
    assert {i: j.state for i, j in jobs.items()} == {
        0: S.PENDING,
        1: S.QUEUED,
        2: S.PENDING,
        3: S.CANCELLED,
        4: S.CANCELLED,
        5: S.SUBMITTING,
        6: S.RETRY_WAIT,
    }
    assert {i for i, j in jobs.items() if j.not_in_manifest} == {1, 2, 3, 4, 5, 6}
    for i in (3, 4):
        dropped = jobs[i]
        assert dropped.error_type == NOT_IN_MANIFEST
        assert dropped.error is not None
        assert "no longer in its manifest" in dropped.error
        assert dropped.finished_at is not None
        assert dropped.actual_usd == 0
        assert dropped.version == before[i][1] + 1  # a move like any other: the fence moves on
        events = session.scalars(select(JobEvent).where(JobEvent.job_id == dropped.id)).all()
        assert [(e.from_state, e.to_state) for e in events] == [(before[i][0], S.CANCELLED)]
    for i in (1, 2, 5, 6):
        assert (jobs[i].state, jobs[i].version, jobs[i].error_type) == (*before[i], None)
    # The dropped jobs' estimates are not counted: 5 of the 7 jobs at $0.40.
    assert _estimates(session, batch.id) == (Decimal("2.00"),) * 3

    # The same manifest again: nothing more to drop, the dropped stay dropped.
    again = store.resubmit_jobs(session, batch.id, [_job(0, 0)], lambda: 1)
    session.commit()
    assert (again.not_in_manifest, again.dropped, again.restored) == (6, 2, 0)

    # Job 4 back in the manifest: the same row, pending again, unmarked; job 3 stays dropped.
    back = store.resubmit_jobs(session, batch.id, [_job(0, 0), _job(4, 1)], lambda: 2)
    session.commit()
    assert (back.added, back.present, back.not_in_manifest, back.dropped, back.restored) == (0, 2, 5, 1, 1)
    jobs = _rows(session, batch.id)
    assert len(jobs) == 7  # one row per job key
    restored = jobs[4]
    assert (restored.state, restored.item_index, restored.not_in_manifest) == (S.PENDING, 1, False)
    assert (restored.error, restored.error_type, restored.finished_at, restored.actual_usd) == (None,) * 4
    assert restored.version == before[4][1] + 2
    assert jobs[3].state == S.CANCELLED
    assert _estimates(session, batch.id) == (Decimal("2.40"),) * 3
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == restored.id).order_by(JobEvent.id)
    ).all()
    assert [(e.from_state, e.to_state) for e in events] == [
        (S.PENDING, S.CANCELLED),
        (S.CANCELLED, S.PENDING),
    ]


def test_a_dropped_job_of_a_claim_that_won_is_left_to_it(session: Session) -> None:
    """The drop is a compare-and-set on the state the resubmit read: a job claimed since
    (``submitting``, its attempt counted) is not cancelled under the claim."""
    batch, _ = store.get_or_create_batch(
        session, name="raced", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(session, batch.id, [_job(0, 0), _job(1, 1)])
    session.commit()
    claimed = _rows(session, batch.id)[1]
    fence = store.Fence.of(claimed, owner="other")
    assert store.mark_submitting(
        session, fence, attempt=1, api_key_id="k", lease_expires_at=datetime(2999, 1, 1, tzinfo=UTC)
    )
    session.commit()
    done = store.resubmit_jobs(session, batch.id, [_job(0, 0)], lambda: 1)
    session.commit()
    assert (done.not_in_manifest, done.dropped) == (1, 0)
    assert _rows(session, batch.id)[1].state == S.SUBMITTING


#: Jobs left out by a resubmit that ended (or stand) as follows: which ones may have been sent.
ENDED: dict[int, dict[str, Any]] = {
    # Ended without a POST: cancelled by a budget or a deadline before their first send, or given
    # a twin's video (reuse_outputs): nothing of them reached fal.
    1: {"state": S.CANCELLED, "error_type": "budget", "actual_usd": 0, "finished_at": SENT},
    2: {"state": S.SUCCEEDED, "reused_from": "x" * 32, "finished_at": SENT},
    # Sent, or a POST went out: they may have been paid for.
    3: {"state": S.SUCCEEDED, "attempts": 1, "submitted_at": SENT, "request_id": "r3", "finished_at": SENT},
    4: {"state": S.CANCELLED, "rate_limited_submits": 1, "actual_usd": 0, "finished_at": SENT},
    5: {"state": S.FAILED, "attempts": 1, "finished_at": SENT},  # claimed: its POST may have gone out
    6: {"state": S.PENDING},  # never sent: dropped
}


def test_a_resubmit_tells_the_ended_jobs_never_sent_from_those_that_may_have_been(session: Session) -> None:
    """The warning said every left-out job not dropped was "already sent … may have been paid
    for", a job a budget cancelled before its first POST too: those that ended without being sent
    are counted apart (``ended_unsent``), and stay as they are."""
    batch, _ = store.get_or_create_batch(
        session, name="ended", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(session, batch.id, [_job(i, i) for i in range(7)])
    for i, values in ENDED.items():
        session.execute(update(Job).where(Job.job_key == f"{i:064x}").values(**values))
    session.commit()

    done = store.resubmit_jobs(session, batch.id, [_job(0, 0)], lambda: 1)
    session.commit()

    assert (done.not_in_manifest, done.dropped, done.ended_unsent, done.kept) == (6, 1, 2, 3)
    jobs = _rows(session, batch.id)
    assert {i: j.state for i, j in jobs.items() if i in (1, 2, 3, 4, 5)} == {
        i: values["state"] for i, values in ENDED.items() if i != 6
    }
    note = batches._not_in_manifest_note("ended", done, 1)
    assert note.startswith(
        "6 job(s) of batch ended are no longer in its manifest: 1 never sent are dropped (cancelled); "
        "2 ended without being sent stay as they are; "
        "3 already sent stay in the batch (they may have been paid for); numbered after its 1 item(s)"
    ), note


def test_a_plain_rerun_with_only_dropped_jobs_has_nothing_to_rerun(engine: Engine) -> None:
    """Every rerun leaves out the jobs a resubmit dropped (never sent: nothing to repeat); when
    that is all of them no batch is made, as for any rerun with nothing to do."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name="gone", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(session, batch.id, [_job(0, 0), _job(1, 1)])
        store.resubmit_jobs(session, batch.id, [_job(0, 0)], lambda: 1)  # job 1 dropped
        # Job 0 dropped by a later resubmit too (the same as job 1, for this test's purpose).
        session.execute(
            update(Job)
            .where(Job.job_key == f"{0:064x}")
            .values(state=S.CANCELLED, error_type=NOT_IN_MANIFEST, not_in_manifest=True)
        )
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    for failed_only in (False, True):
        with pytest.raises(NothingToRerun) as nothing:
            rerun_batch("gone", failed_only=failed_only, settings=settings)
        assert "no batch was created" in str(nothing.value)
        assert "2 " in str(nothing.value), str(nothing.value)
    with pytest.raises(NothingToRerun) as plain:
        rerun_batch("gone", settings=settings)
    said = str(plain.value)
    assert said.startswith("nothing to rerun: batch gone ("), said
    assert "has no job to repeat (2 dropped from its manifest, never sent, are left out)" in said, said
    with db.read_scope(engine) as session:
        assert [b.name for b in store.list_batches(session)] == ["gone"]


def test_rerun_failed_only_leaves_out_a_dropped_job_whose_mark_is_gone(engine: Engine) -> None:
    """``rerun --failed-only`` went by the ``not_in_manifest`` mark alone: a job dropped by
    state (``cancelled``, ``error_type`` ``not_in_manifest``) whose mark was lost — an older
    ``serve`` or an ``alembic downgrade`` and upgrade that refilled it from nothing — was sent
    again and billed. It is left out by its state too, as the plain rerun leaves it out."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name="lost", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
        )
        store.add_jobs(session, batch.id, [_job(0, 0), _job(1, 1)])
        store.resubmit_jobs(session, batch.id, [_job(0, 0)], lambda: 1)  # job 1 dropped
        session.execute(update(Job).values(not_in_manifest=False))  # the mark lost
        session.execute(
            update(Job).where(Job.job_key == f"{0:064x}").values(state=S.FAILED, error_type="fal_error")
        )
    settings = Settings(database_url=engine.url.render_as_string(hide_password=False))
    result = rerun_batch("lost", failed_only=True, settings=settings)
    with db.read_scope(engine) as session:
        rerun = {j.rerun_of for j in store.jobs_of_batch(session, result.batch_id)}
        parent = {
            int(j.job_key, 16): j.id
            for j in store.jobs_of_batch(session, store.get_batch(session, "lost").id)
        }
    assert rerun == {parent[0]}
    assert any(
        "1 failed or cancelled job(s) of batch lost are no longer in its manifest" in w
        for w in result.warnings
    )
