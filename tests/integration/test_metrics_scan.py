"""``/metrics`` does not read every finished job on every scrape (SQLite and PostgreSQL).

The sums of the jobs finished long ago are kept between scrapes (:class:`jobs.metrics.FinishedTotals`):

* what a scrape publishes is byte for byte what the full pass over every job publishes, across
  jobs finishing, finished jobs sealing, a finished job taken back out of ``failed`` and
  ``cancelled`` (late proofs) and a note on a finished job's books;
* a scrape after the first reads no job twice: no statement of it scans the jobs table, and on
  PostgreSQL the rows of ``jobs`` its plans read stay below the finished jobs stored.

Durations are multiples of 84.375 s (1/1024 of a day) and inference times of 0.5 s, exact in
binary on both dialects (SQLite's Julian days included), so every float sum is exact too.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, event, text

from jobs import db, store
from jobs.metrics import SETTLE, FinishedTotals, snapshot
from jobs.states import JobState as S
from tests.step_runtime import add_batch
from web.metrics import DatabaseCollector, _families

T0 = datetime(2026, 5, 1, tzinfo=UTC)
STEP = timedelta(seconds=84.375)


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def _render(metrics: list[Metric]) -> str:
    registry = CollectorRegistry()
    registry.register(_Fixed(metrics))
    return generate_latest(registry).decode()


def full_scan(engine: Engine) -> str:
    """The page as the full pass over every job publishes it (no kept sums)."""
    with db.read_scope(engine, snapshot=True) as session:
        return _render(list(_families(snapshot(session))))


def cached(collector: DatabaseCollector) -> str:
    """The page as ``serve``'s collector publishes it, without its three gauges about itself and
    the database (up, its query time, the schema)."""
    metrics = list(collector.collect())
    assert [m.name for m in metrics[:3]] == [
        "wanbatch_database_up",
        "wanbatch_metrics_query_seconds",
        "wanbatch_database_schema_current",
    ]
    return _render(metrics[3:])


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def move(engine: Engine, job_id: str, path: list[S], **fields: Any) -> None:
    """Walk ``job_id`` along ``path`` (its current state first); ``fields`` go with the last move."""
    with db.session_scope(engine) as session:
        for index, (frm, to) in enumerate(itertools.pairwise(path)):
            last = index == len(path) - 2
            assert store.transition(session, job_id, frm, to, reason="test", **(fields if last else {}))


SUCCESS = [S.PENDING, S.SUBMITTING, S.QUEUED, S.RUNNING, S.DOWNLOADING, S.SUCCEEDED]


def succeed(engine: Engine, job_id: str, i: int, finished: datetime) -> None:
    submitted = T0 + STEP * (i % 7)
    completed = submitted + STEP * (i % 5 + 1)
    move(
        engine,
        job_id,
        SUCCESS,
        submitted_at=submitted,
        completed_at=completed,
        finished_at=finished,
        provider_metrics={"inference_time": 0.5 * (i % 6)},
        attempts=1 + i % 2,
        actual_usd=Decimal("0.25"),
    )


def fail_unknown(engine: Engine, job_id: str, i: int, finished: datetime) -> None:
    move(engine, job_id, [S.PENDING, S.SUBMITTING], attempts=1)
    move(engine, job_id, [S.SUBMITTING, S.SUBMIT_UNKNOWN], submitted_at=T0 + STEP * i)
    move(
        engine,
        job_id,
        [S.SUBMIT_UNKNOWN, S.FAILED],
        error="outcome unknown",
        error_type="submit_unknown",
        finished_at=finished,
    )


def seed(engine: Engine, finished_at: datetime) -> tuple[list[str], list[str]]:
    """40 + 6 jobs, created at ``T0``: 30 succeeded, 4 failed (unknown submits), 2 cancelled
    unsent, the rest pending or at fal; the ids of the main batch and the second one."""
    wan = [("fal-ai/wan-22", {"prompt": f"p{i}"}) for i in range(40)]
    first = add_batch(engine, "scan-a", wan)
    second = add_batch(engine, "scan-b", [("fal-ai/wan-i2v", {"prompt": f"q{i}"}) for i in range(6)])
    with db.session_scope(engine) as session:
        session.execute(text("UPDATE jobs SET created_at = :t"), {"t": T0 - STEP})
    with db.read_scope(engine) as session:
        a = [job.id for job in store.jobs_of_batch(session, first)]
        b = [job.id for job in store.jobs_of_batch(session, second)]
    for i, job_id in enumerate(a[:30]):
        succeed(engine, job_id, i, finished_at + STEP * (i % 3))
    for i, job_id in enumerate(a[30:34]):
        fail_unknown(engine, job_id, i, finished_at)
    for job_id in a[34:36]:
        move(engine, job_id, [S.PENDING, S.CANCELLED], error="cancelled", error_type="cancel")
    move(engine, a[36], [S.PENDING, S.SUBMITTING, S.QUEUED], submitted_at=T0 + STEP)
    for i, job_id in enumerate(b[:3]):
        succeed(engine, job_id, i + 1, finished_at)
    return a, b


def test_the_page_is_the_full_passs_across_finishing_sealing_and_leaving_a_terminal_state(
    engine: Engine,
) -> None:
    clock = Clock(T0 + timedelta(days=1))
    a, b = seed(engine, finished_at=T0 + 4 * STEP)  # finished long before the clock: sealed at once
    collector = DatabaseCollector(engine)
    collector.finished = FinishedTotals(clock=clock)

    def same() -> str:
        page = cached(collector)
        assert page == full_scan(engine)
        return page

    first = same()
    assert 'wanbatch_jobs{state="succeeded"} 33.0' in first
    assert collector.finished.rebuilds == 1

    # Jobs finishing now (within SETTLE of the clock): read live, then sealed as the clock moves on.
    for i, job_id in enumerate(b[3:5]):
        succeed(engine, job_id, i + 2, clock.now - STEP)
    same()
    clock.now += SETTLE + STEP
    same()
    move(engine, a[36], [S.QUEUED, S.CANCELLED], error="cancelled at fal", error_type="cancel")
    same()
    clock.now += SETTLE * 3
    same()
    assert collector.finished.rebuilds == 1  # sealing moved on by ranges, never a full pass

    # A failed job (long sealed) taken back by a late proof: out of the sums, not counted twice.
    with db.session_scope(engine) as session:
        job = store.get_job(session, a[30])
        fence = store.Fence.of(job, "test")
        assert store.adopt_late_proof(
            session,
            fence,
            request_id="req-late",
            gateway_request_id=None,
            attempt=1,
            next_poll_at=clock.now,
            reason="late proof",
        )
    page = same()
    assert 'wanbatch_jobs{state="failed"} 3.0' in page
    assert collector.finished.rebuilds == 2
    # … and finished again, now: counted once more, live first, then sealed.
    move(
        engine,
        a[30],
        [S.QUEUED, S.RUNNING, S.DOWNLOADING, S.SUCCEEDED],
        completed_at=T0 + STEP * 9,
        finished_at=clock.now,
        actual_usd=Decimal("0.25"),
    )
    same()
    clock.now += SETTLE * 2
    same()

    # A note on a sealed succeeded job's books (a duplicate charge proved later).
    with db.session_scope(engine) as session:
        note = store.note_duplicate_charge(
            session, a[0], "req-dup", reason="accepted as req-dup", worker=None, outcome=None, now=clock.now
        )
        assert note == "counted"
    page = same()
    assert "wanbatch_confirmed_duplicate_charges_total 1.0" in page
    assert collector.finished.rebuilds == 3


def _jobs_rows_read_pg(conn: Any, statement: str, parameters: Any) -> int:
    """Rows of ``jobs`` that the plan of ``statement`` reads (kept and filtered out), on PostgreSQL."""
    plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).scalar_one()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    read = 0

    def walk(node: dict[str, Any]) -> None:
        nonlocal read
        if node.get("Relation Name") == "jobs":
            loops = int(node.get("Actual Loops", 1))
            read += loops * (int(node.get("Actual Rows", 0)) + int(node.get("Rows Removed by Filter", 0)))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return read


def test_a_scrape_after_the_first_does_not_read_the_finished_jobs(engine: Engine) -> None:
    clock = Clock(T0 + timedelta(days=1))
    seed(engine, finished_at=T0 + 4 * STEP)
    finished = 39
    collector = DatabaseCollector(engine)
    collector.finished = FinishedTotals(clock=clock)
    cached(collector)  # the first scrape builds the sums: one pass over the finished jobs

    statements: list[tuple[str, Any]] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        clock.now += STEP
        page = cached(collector)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert page == full_scan(engine)
    on_jobs = [(sql, params) for sql, params in statements if " jobs" in sql and "EXPLAIN" not in sql]
    assert len(on_jobs) >= 5  # job_totals and the four histograms
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")
            for sql, params in on_jobs:
                read = _jobs_rows_read_pg(conn, sql, params)
                plan = conn.exec_driver_sql("EXPLAIN (ANALYZE) " + sql, params).all()
                assert read < finished, "\n".join(r[0] for r in plan)
        else:
            for sql, params in on_jobs:
                plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)]
                assert not [step for step in plan if step.startswith("SCAN jobs")], (plan, sql)
                assert not [step for step in plan if step.startswith("SCAN batches")], (plan, sql)
