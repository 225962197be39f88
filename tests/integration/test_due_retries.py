"""A dispatch round finds the due ``retry_wait`` jobs without reading those still backing off.

A 5xx outage leaves thousands of jobs in ``retry_wait``, each waiting out its backoff. A round
used to look for due ones whenever any job was in ``retry_wait``, reading a batch's
``retry_wait`` jobs in claim order and skipping the ones not due yet: every one of them, on every
round (12 ms at 8,000, linear, on every completion). Now:

* a round whose retries are none of them due runs no claim query for them at all;
* the due ones are read through the index on ``next_attempt_at`` (the plan, SQLite's
  ``EXPLAIN QUERY PLAN`` and PostgreSQL's ``EXPLAIN``, of the statements a round really runs),
  whether due at once (no ``next_attempt_at``) or because their moment has come;
* and they are still claimed oldest first, up to the round's room, as before — also when more
  are due than the index path sorts (:data:`jobs.store.FEW_DUE_RETRIES`), where the claim reads
  them in claim order again.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, update

from jobs import db, store
from jobs.models import Job, utcnow
from jobs.states import JobState
from tests.step_runtime import add_batch, job_ids, make_runtime, settings_for
from worker.steps import dispatch

S = JobState
KEY = "8d3c1f0e-5a6b-4c7d-9e8f-0a1b2c3d4e5f:0f1e2d3c4b5a69788796a5b4c3d2e1f0"
T2V = "fal-ai/wan-22"
#: Jobs waiting out their backoff: enough that PostgreSQL's planner, too, sees a table worth an index.
BACKING_OFF = 3000
#: The due ones, by item: due at once (no ``next_attempt_at``) and due since a minute ago,
#: interleaved in claim order, none of them first.
DUE_AT_ONCE = (40, 1700)
DUE_BY_NOW = (7, 900, 2999)


@pytest.fixture
def outage(engine: Engine) -> tuple[str, list[str]]:
    """A batch whose jobs all wait for a retry, the few of :data:`DUE_AT_ONCE` and
    :data:`DUE_BY_NOW` due, every other one not for an hour; its id and its jobs' ids in item
    order."""
    batch_id = add_batch(engine, "outage", [(T2V, {"prompt": f"p{i}"}) for i in range(BACKING_OFF)])
    ids = job_ids(engine, batch_id)
    _wait(engine, ids, utcnow() + timedelta(hours=1))
    return batch_id, ids


def _wait(engine: Engine, ids: list[str], until: Any) -> None:
    with db.session_scope(engine) as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(state=S.RETRY_WAIT, next_attempt_at=until))


def _make_due(engine: Engine, ids: list[str]) -> None:
    _wait(engine, [ids[i] for i in DUE_AT_ONCE], None)
    _wait(engine, [ids[i] for i in DUE_BY_NOW], utcnow() - timedelta(minutes=1))
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:  # the table's size, as autovacuum would have learnt it by now
            conn.exec_driver_sql("ANALYZE jobs")


@pytest.fixture
def executed(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every statement the engine runs while the test does, with its parameters as sent."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        seen.append((statement, parameters))

    target = db.writer_engine(engine)
    event.listen(target, "before_cursor_execute", record)
    yield seen
    event.remove(target, "before_cursor_execute", record)


def _values(parameters: Any) -> list[Any]:
    return list(parameters.values()) if isinstance(parameters, dict) else list(parameters or ())


def _retry_claims(executed: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The claim queries a round ran for ``retry_wait`` jobs (their candidate rows, whole)."""
    return [
        (sql, parameters)
        for sql, parameters in executed
        if sql.lstrip().startswith("SELECT jobs.id,")
        # the state a parameter, or spelt out as the partial indexes on next_attempt_at need it
        and ("retry_wait" in _values(parameters) or "jobs.state = 'retry_wait'" in sql)
    ]


def _plan(engine: Engine, sql: str, parameters: Any) -> list[str]:
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, parameters).all()
            return [str(row[-1]) for row in rows]
        conn.exec_driver_sql("SET enable_seqscan = off")  # a small table: the indexes, not a scan
        return [str(row[0]) for row in conn.exec_driver_sql("EXPLAIN " + sql, parameters).all()]


def _reads_jobs_by_due_moment(engine: Engine, plan: list[str]) -> bool:
    """Whether ``plan`` reads the jobs through the index on their ``next_attempt_at``, bounded by
    it, and never through an index in claim order (which walks every job not due yet)."""
    text = "\n".join(plan)
    if "ix_jobs_batch_id_state_order" in text or "ix_jobs_state_order" in text:
        return False
    if engine.dialect.name == "sqlite":
        reads = [line for line in plan if line.startswith(("SEARCH jobs", "SCAN jobs"))]
        return bool(reads) and all("next_attempt_at" in line and "_next_attempt_at" in line for line in reads)
    conditions = [line for line in plan if "Index Cond" in line]
    scans = [line for line in plan if "next_attempt_at on jobs" in line]
    return (
        bool(scans)
        and any("next_attempt_at" in line for line in conditions)
        and "Seq Scan on jobs" not in text
    )


@pytest.mark.parametrize("whose", ["run", "leader"])
def test_a_round_reads_the_due_retries_through_their_moment(
    engine: Engine, outage: tuple[str, list[str]], executed: list[tuple[str, Any]], whose: str
) -> None:
    batch_id, ids = outage
    _make_due(engine, ids)
    scoped = frozenset({batch_id}) if whose == "run" else None  # an embedded run, or a leader (every batch)
    rt = make_runtime(engine, settings_for("http://127.0.0.1:9", KEY, max_outstanding=2), batch_ids=scoped)
    executed.clear()
    assert dispatch(rt) == [ids[7], ids[40]]
    claims = _retry_claims(executed)
    assert claims, "the round ran no claim query for retry_wait jobs"
    for sql, parameters in claims:
        plan = _plan(engine, sql, parameters)
        assert _reads_jobs_by_due_moment(engine, plan), "\n".join([sql, *plan])


def test_due_retries_are_claimed_oldest_first_while_thousands_back_off(
    engine: Engine,
    outage: tuple[str, list[str]],
    executed: list[tuple[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch_id, ids = outage
    rt = make_runtime(
        engine, settings_for("http://127.0.0.1:9", KEY, max_outstanding=3), batch_ids=frozenset({batch_id})
    )
    assert dispatch(rt) == []
    assert not _retry_claims(executed)  # none due: no claim looks for them
    with db.read_scope(engine) as session:
        assert not store.in_flight(
            session, scope=rt.cap_scope(), sent_before=utcnow(), now=utcnow()
        ).retry_due
    _make_due(engine, ids)
    due = sorted(DUE_AT_ONCE + DUE_BY_NOW)
    assert dispatch(rt) == [ids[i] for i in due[:3]]  # oldest first, up to the room (3 outstanding)
    # More due than the index path sorts: read in claim order again, with the same result.
    monkeypatch.setattr(store.due, "FEW_DUE_RETRIES", 1)  # where the claim reads it
    rt = make_runtime(
        engine, settings_for("http://127.0.0.1:9", KEY, max_outstanding=5), batch_ids=frozenset({batch_id})
    )
    assert dispatch(rt) == [ids[i] for i in due[3:]]
    with db.read_scope(engine) as session:
        assert store.count_in_states(session, [S.RETRY_WAIT]) == BACKING_OFF - len(due)
        assert not store.in_flight(
            session, scope=rt.cap_scope(), sent_before=utcnow(), now=utcnow()
        ).retry_due
