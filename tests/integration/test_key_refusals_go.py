"""fal's refusal of a request to a key (``key_refusals``) goes once its job leaves the states
it describes (on both dialects).

Review: a mark whose job had since ended another way (finished, failed, cancelled, sent anew)
stayed in the table for good, ignored by every read: the table grew with every such job. Now
the move out of :data:`jobs.store.REFUSABLE_STATES` deletes the job's marks with it (on
PostgreSQL in the move's own statement), and a move between those states keeps them.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Engine, func, select, update

from jobs import db, store
from jobs.models import Job, KeyRefusal, utcnow
from jobs.states import JobState

S = JobState


def _jobs(engine: Engine, states: list[JobState]) -> list[str]:
    """One job per state, each sent with key id ``sender`` as request ``r<i>``, refused to ``mine``."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name="refused", manifest_path="m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
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
                    est_usd=Decimal(1),
                )
                for i in range(len(states))
            ],
        )
        ids = []
        for job, state in zip(store.jobs_of_batch(session, batch.id), states, strict=True):
            rid = f"r{job.item_index}"
            values = {"state": state, "request_id": rid, "api_key_id": "sender", "submitted_at": utcnow()}
            session.execute(update(Job).where(Job.id == job.id).values(**values))
            assert store.note_key_refused(
                session, job.id, rid, sent_with="sender", key_id="mine", now=utcnow()
            )
            ids.append(job.id)
        return ids


def _marked(engine: Engine) -> set[str]:
    with db.read_scope(engine) as session:
        return set(session.scalars(select(KeyRefusal.job_id)))


def test_a_jobs_refusals_go_when_it_leaves_the_states_they_describe(engine: Engine) -> None:
    queued, running, downloading, cancelling = _jobs(
        engine, [S.QUEUED, S.RUNNING, S.DOWNLOADING, S.CANCELLING]
    )
    assert _marked(engine) == {queued, running, downloading, cancelling}
    with db.session_scope(engine) as session:
        # Between the states it describes: the mark stays (fal still refuses that request).
        assert store.transition(session, queued, S.QUEUED, S.RUNNING, reason="started")
        assert store.transition(session, running, S.RUNNING, S.DOWNLOADING, reason="finished at fal")
    assert _marked(engine) == {queued, running, downloading, cancelling}
    with db.session_scope(engine) as session:
        assert store.transition(session, queued, S.RUNNING, S.FAILED, reason="written off")
        assert store.transition(session, running, S.DOWNLOADING, S.SUCCEEDED, reason="downloaded")
        assert store.transition(session, cancelling, S.CANCELLING, S.CANCELLED, reason="cancelled")
    assert _marked(engine) == {downloading}
    with db.session_scope(engine) as session:  # sent anew: the old request's mark describes nothing
        assert store.transition(session, downloading, S.DOWNLOADING, S.RETRY_WAIT, reason="again")
    assert _marked(engine) == set()
    with db.read_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(KeyRefusal)) == 0


def test_a_move_that_does_not_happen_leaves_the_mark(engine: Engine) -> None:
    (queued,) = _jobs(engine, [S.QUEUED])
    with db.session_scope(engine) as session:  # fenced on a state it is not in: nothing moves
        assert not store.transition(session, queued, S.RUNNING, S.FAILED, reason="late")
    assert _marked(engine) == {queued}
    with db.session_scope(engine) as session:
        assert store.refused_requests(session, store.get_job(session, queued).batch_id, key_id="mine")
