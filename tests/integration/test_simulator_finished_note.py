"""What a stopped ``--simulate`` run's simulator finished before the run learnt of it is a note
on the job's history, never the job's ``provider_output`` (on both dialects).

Audit: :func:`jobs.store.note_simulated_finished` wrote ``{"seed": …}`` into the
``provider_output`` of jobs still ``queued``, ``running`` or ``cancelling``: ``export`` (and
anything reading fal's result) showed a result for a job that had fetched none, until the next
``--simulate`` run. ``provider_output`` holds only what the job's own finished request returned;
the hand-over (:func:`jobs.store.simulated_results`) reads the note.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Engine, select, update

from jobs import db, store
from jobs.models import Batch, Job, JobEvent, utcnow
from jobs.states import JobState

S = JobState


def _batch(engine: Engine, name: str, states: list[JobState], *, simulated: bool = True) -> str:
    """A batch of one job per state, job ``i`` holding request ``<name>-r<i>``; its id."""
    with db.session_scope(engine) as session:
        batch, _ = store.get_or_create_batch(
            session, name=name, manifest_path=f"{name}.yaml", manifest_sha256="0" * 64, budget_max_usd=None
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
        session.execute(update(Batch).where(Batch.id == batch.id).values(simulated=simulated))
        for job, state in zip(store.jobs_of_batch(session, batch.id), states, strict=True):
            values = {"state": state, "request_id": f"{name}-r{job.item_index}", "submitted_at": utcnow()}
            session.execute(update(Job).where(Job.id == job.id).values(**values))
        return batch.id


def test_the_finish_is_noted_on_the_history_not_in_the_output(engine: Engine) -> None:
    sim = _batch(engine, "sim", [S.QUEUED, S.RUNNING, S.CANCELLING, S.PENDING])
    paid = _batch(engine, "paid", [S.QUEUED], simulated=False)
    finished = {"sim-r0": 11, "sim-r1": 12, "sim-r2": None, "paid-r0": 14}
    with db.session_scope(engine) as session:
        assert store.note_simulated_finished(session, finished) == 3
    with db.session_scope(engine) as session:
        assert store.note_simulated_finished(session, finished) == 0  # once per request
    with db.read_scope(engine) as session:
        outputs = session.execute(select(Job.request_id, Job.provider_output, Job.seed, Job.version)).all()
        assert {(rid, out, seed, v) for rid, out, seed, v in outputs} == {
            ("sim-r0", None, None, 0),
            ("sim-r1", None, None, 0),
            ("sim-r2", None, None, 0),
            ("sim-r3", None, None, 0),
            ("paid-r0", None, None, 0),
        }
        notes = session.execute(
            select(JobEvent.from_state, JobEvent.to_state, JobEvent.details).order_by(JobEvent.id)
        ).all()
        # Notes that move nothing (no version bump: no worker's fence disturbed), one per job.
        assert all(moved_from == moved_to for moved_from, moved_to, _ in notes), notes
        assert sorted(JobState(t).value for _, t, _ in notes) == ["cancelling", "queued", "running"]
        assert sorted(d["seed"] for _, _, d in notes if d["seed"] is not None) == [11, 12]
        assert store.simulated_results(session, sim) == {
            "sim-r0": {"seed": 11},
            "sim-r1": {"seed": 12},
            "sim-r2": {"seed": None},
        }
        assert store.simulated_results(session, paid) == {}


def test_a_job_that_moved_on_is_no_longer_handed_over_by_its_note(engine: Engine) -> None:
    sim = _batch(engine, "moved", [S.QUEUED, S.QUEUED])
    with db.session_scope(engine) as session:
        assert store.note_simulated_finished(session, {"moved-r0": 5, "moved-r1": 6}) == 2
        # r0's result was fetched (its own, from the next simulator); r1 was sent again as r9
        result = {"video": {"url": "http://127.0.0.1:1/files/x.mp4"}, "seed": 5}
        fetched = {"state": S.DOWNLOADING, "provider_output": result}
        session.execute(update(Job).where(Job.request_id == "moved-r0").values(**fetched))
        session.execute(update(Job).where(Job.request_id == "moved-r1").values(request_id="moved-r9"))
    with db.read_scope(engine) as session:
        assert store.simulated_results(session, sim) == {"moved-r0": result}


def test_a_finish_an_earlier_version_put_in_the_output_is_still_handed_over(engine: Engine) -> None:
    sim = _batch(engine, "legacy", [S.RUNNING])
    with db.session_scope(engine) as session:
        session.execute(update(Job).values(provider_output={"seed": 9}))
    with db.session_scope(engine) as session:
        assert store.simulated_results(session, sim) == {"legacy-r0": {"seed": 9}}
        assert store.forget_simulated_results(session, sim, ["legacy-r0"]) == 1
    with db.read_scope(engine) as session:
        assert session.scalar(select(Job.provider_output)) is None
