"""A cancel a process gave up at fal is noted on the job's history, and ``status`` reads it
once that process has ended (on both dialects).

Audit: the give-up (:mod:`worker.steps.cancel_tries`) was kept in the memory of the process that
made it. Once an embedded ``cancel`` had ended, ``status`` showed the batch cancelled and its jobs
``queued``, and nothing said that fal never took their cancels — fal may still run and bill them.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Engine, select, update

from jobs import batches, db, store
from jobs.models import Batch, BatchState, Job, JobEvent, utcnow
from jobs.settings import DatabaseSettings
from jobs.states import JobState

S = JobState


def _batch(engine: Engine, name: str, states: list[JobState], *, cancelled: bool = True) -> str:
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
        if cancelled:
            session.execute(update(Batch).where(Batch.id == batch.id).values(state=BatchState.CANCELLED))
        for job, state in zip(store.jobs_of_batch(session, batch.id), states, strict=True):
            values = {"state": state, "request_id": f"{name}-r{job.item_index}", "submitted_at": utcnow()}
            session.execute(update(Job).where(Job.id == job.id).values(**values))
        return batch.id


def _ids(engine: Engine, batch_id: str) -> list[str]:
    with db.read_scope(engine) as session:
        return [j.id for j in sorted(store.jobs_of_batch(session, batch_id), key=lambda j: j.item_index)]


def _give_up(engine: Engine, job_id: str, request_id: str, error: str = "HTTP 301 redirect") -> bool:
    with db.session_scope(engine) as session:
        return store.note_cancel_given_up(
            session, job_id, request_id, error=error, tries=5, worker="host:1:", now=utcnow()
        )


def test_a_given_up_cancel_is_noted_and_read_while_the_job_waits_on_that_request(engine: Engine) -> None:
    cancelled = _batch(engine, "gone", [S.QUEUED, S.RUNNING, S.CANCELLING])
    q, r, c = _ids(engine, cancelled)
    assert _give_up(engine, q, "gone-r0")
    assert _give_up(engine, r, "gone-r1", "HTTP 502 from the gateway")
    assert not _give_up(engine, c, "gone-r2")  # fal took its cancel: nothing to note
    assert not _give_up(engine, q, "another-request")  # the job waits on another request
    with db.read_scope(engine) as session:
        notes = session.execute(select(JobEvent.from_state, JobEvent.to_state, JobEvent.version)).all()
        # Notes that move nothing (no version bump: no worker's fence disturbed).
        assert sorted((JobState(str(f)).value, JobState(t).value, v) for f, t, v in notes) == [
            ("queued", "queued", 0),
            ("running", "running", 0),
        ]
        found = store.uncancelled_requests(session, [cancelled])[cancelled]
    assert [(u.job_id, u.request_id, u.error, u.tries) for u in found] == [
        (q, "gone-r0", "HTTP 301 redirect", 5),
        (r, "gone-r1", "HTTP 502 from the gateway", 5),
    ]

    # status, one batch and every batch: the same words, the requests named, never a traceback.
    (one,) = batches.status(cancelled, _settings(engine))
    every = batches.status(None, _settings(engine))
    assert [u["request_id"] for u in one["uncancelled"]] == ["gone-r0", "gone-r1"]
    assert one["uncancelled_note"].startswith(
        "2 request(s) of this cancelled batch could not be cancelled at fal"
    )
    assert "request gone-r0: HTTP 301 redirect (5 tries)" in one["uncancelled_note"]
    assert "`wanbatch cancel gone` asks fal again" in one["uncancelled_note"]
    assert [b["uncancelled"] for b in every] == [one["uncancelled"]]

    # A later cancel fal takes (cancelling), or fal's end of the request: no longer named.
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == q).values(state=S.CANCELLING))
        session.execute(update(Job).where(Job.id == r).values(request_id="gone-r1-again"))
    with db.read_scope(engine) as session:
        assert store.uncancelled_requests(session, [cancelled]) == {}
    (after,) = batches.status(cancelled, _settings(engine))
    assert after["uncancelled"] == []
    assert after["uncancelled_note"] == ""


def test_the_latest_give_up_of_a_job_is_the_one_read(engine: Engine) -> None:
    cancelled = _batch(engine, "twice", [S.QUEUED])
    (job,) = _ids(engine, cancelled)
    assert _give_up(engine, job, "twice-r0", "HTTP 301 redirect")
    assert _give_up(engine, job, "twice-r0", "connection refused")  # the next cancel's process
    with db.read_scope(engine) as session:
        (found,) = store.uncancelled_requests(session, [cancelled])[cancelled]
    assert (found.request_id, found.error) == ("twice-r0", "connection refused")


def _settings(engine: Engine) -> DatabaseSettings:
    return DatabaseSettings(database_url=engine.url.render_as_string(hide_password=False))
