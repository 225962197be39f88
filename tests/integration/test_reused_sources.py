"""Where a batch's reused videos were made (:func:`jobs.listing.reused_sources`), on both dialects.

The ``hf`` dataset card names them (export audit, session 34): a job that took another job's
video (``reused_from``: ``reuse_outputs``, or a rerun taking back a staged video its parent
paid for) counts under the batch of the job it names; a job of the same batch under that batch;
a job no longer stored under None. Only the jobs in the states asked for count.
"""

from __future__ import annotations

from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from jobs import listing
from jobs.models import Job
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids

S = JobState


def _jobs(engine: Engine, name: str, n: int) -> tuple[str, list[str]]:
    batch = add_batch(engine, name, [("fal-ai/wan-22", {"prompt": f"{name} {i}"}) for i in range(n)])
    return batch, job_ids(engine, batch)


def test_reused_videos_are_counted_by_the_batch_that_made_them(engine: Engine, session: Session) -> None:
    parent, (p0, p1) = _jobs(engine, "parent", 2)
    other, (o0,) = _jobs(engine, "other", 1)
    batch, (a, b, c, d, e, f, g) = _jobs(engine, "takes", 7)
    taken = {
        a: (S.SUCCEEDED, p0),  # reuse_outputs
        b: (S.SUCCEEDED, p1),  # a rerun taking its parent's staged video back
        c: (S.FAILED, p0),  # took it, then failed: counted only when failed rows are
        d: (S.SUCCEEDED, o0),
        e: (S.SUCCEEDED, g),  # a twin of the same batch
        f: (S.SUCCEEDED, "0" * 32),  # a job no longer stored
        g: (S.SUCCEEDED, None),  # sent: no source
    }
    for job_id, (state, source) in taken.items():
        session.execute(update(Job).where(Job.id == job_id).values(state=state, reused_from=source))
    session.commit()

    def sources(*states: JobState) -> list[tuple[str | None, str | None, int]]:
        return [(s.batch_id, s.name, s.jobs) for s in listing.reused_sources(session, batch, states)]

    assert sources(S.SUCCEEDED) == [
        (parent, "parent", 2),
        (other, "other", 1),
        (batch, "takes", 1),
        (None, None, 1),
    ]
    assert sources(S.SUCCEEDED, S.FAILED, S.CANCELLED)[0] == (parent, "parent", 3)
    assert sources(S.CANCELLED) == []
