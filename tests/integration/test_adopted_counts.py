"""``status`` counts the jobs adopted from the outputs folder through their events' partial index.

Jobs adopted from their sidecar and verified video (a database restored from an older backup,
:func:`jobs.store.outcomes.mark_adopted`) are told by one event's reason. The count first joined
every event of every succeeded job of the batches asked about: about 600,000 rows read on each
``status`` of a 100,000-job batch. It now starts from ``ix_job_events_adopted`` (migration 0047),
which holds only those events: the plan, SQLite's ``EXPLAIN QUERY PLAN`` and PostgreSQL's
``EXPLAIN``, of the statement the count really runs, reads ``job_events`` through that index and
never walks the batch's jobs' events.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event, update
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.models import ADOPTED_REASON, Job, JobEvent
from jobs.states import JobState
from tests.integration.test_store import make_batch


def _plan(engine: Engine, sql: str, parameters: Any) -> str:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, parameters).all()
            return "\n".join(str(row[-1]) for row in rows)
        conn.exec_driver_sql("SET enable_seqscan = off")  # a small table: the indexes, not a scan
        return "\n".join(str(row[0]) for row in conn.exec_driver_sql("EXPLAIN " + sql, parameters).all())


def test_adopted_jobs_are_counted_per_batch_from_their_events_index(engine: Engine, session: Session) -> None:
    first = make_batch(session, "first", n=4)
    second = make_batch(session, "second", n=3)
    make_batch(session, "none", n=2)
    jobs = {b.id: [j.id for j in store.jobs_of_batch(session, b.id)] for b in (first, second)}
    adopted = [*jobs[first.id][:2], jobs[second.id][0]]
    done = update(Job).where(Job.batch_id.in_([first.id, second.id])).values(state=JobState.SUCCEEDED)
    session.execute(done)

    def succeeded(job_id: str, reason: str) -> JobEvent:
        return JobEvent(
            job_id=job_id, from_state=JobState.PENDING, to_state=JobState.SUCCEEDED, version=2, reason=reason
        )

    for job_id in [*jobs[first.id], *jobs[second.id]]:
        session.add(succeeded(job_id, ADOPTED_REASON if job_id in adopted else "result fetched"))
    # an adopted job with a second such event counts once
    session.add(succeeded(adopted[0], ADOPTED_REASON))
    session.commit()

    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    engines = {engine, db.writer_engine(engine)}  # SQLite's units of work: an engine of its own
    for one in engines:
        event.listen(one, "before_cursor_execute", record)
    try:
        counts = store.adopted_counts(session, [first.id, second.id, "no-such-batch"])
    finally:
        for one in engines:
            event.remove(one, "before_cursor_execute", record)
    assert counts == {first.id: 2, second.id: 1}
    session.rollback()  # SQLite: this process's writer lock goes with the session's transaction

    (statement, parameters) = next((s, p) for s, p in seen if "job_events" in s)
    plan = _plan(engine, statement, parameters)
    assert "ix_job_events_adopted" in plan, plan
    assert "ix_job_events_job_id" not in plan, plan
