"""The plans of a resubmit's statements over the manifest's keys (:func:`jobs.store.resubmit_jobs`).

A manifest submitted again with anything left out marks, drops and numbers anew the jobs whose
key it no longer has. That set was ``job_key NOT IN (SELECT job_key FROM wanbatch_seen_keys)``,
written into the mark UPDATE, the two drop UPDATEs and the final SELECT: on PostgreSQL a
``NOT IN`` is never an anti-join, only a filter running a subplan for each job, hashed while the
keys fit in ``work_mem`` and otherwise a scan of every key for every job. At 100,000 jobs with
one item left out the resubmit ran for more than 15 minutes (``python -m bench.manifest_scale
--sizes 100k --resubmit``). Each statement is explained here, on the connection that runs it,
just before it runs: none filters by a subplan, and the left-out jobs are found by an anti-join.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from jobs import db, store
from jobs.models import Job
from jobs.states import JobState as S

#: The temporary tables a resubmit's statements over the manifest's keys read.
TEMPORARY = ("wanbatch_seen_keys", "wanbatch_left_out", "wanbatch_stood_for")


def _job(i: int) -> store.NewJob:
    return store.NewJob(
        key=f"{i:064x}",
        item_index=i // 2,
        variant=i % 2,
        endpoint="fal-ai/wan-22",
        input={"prompt": f"job {i}"},
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
    )


@pytest.fixture
def plans(engine: Engine) -> Iterator[list[tuple[str, str]]]:
    """``(statement, plan)`` of every statement run that reads a temporary table of the
    resubmit: the plan the database makes for it, asked on the same connection right before."""
    seen: list[tuple[str, str]] = []
    pg = engine.dialect.name == "postgresql"

    def explain(_conn: Any, cursor: Any, statement: str, parameters: Any, _context: Any, many: bool) -> None:
        words = statement.split()
        if many or not words or words[0].upper() not in ("SELECT", "UPDATE", "INSERT", "DELETE", "WITH"):
            return
        if not any(name in statement for name in TEMPORARY):
            return
        if pg:
            cursor.execute("EXPLAIN " + statement, parameters)
            plan = "\n".join(row[0] for row in cursor.fetchall())
        else:
            cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            plan = "\n".join(row[3] for row in cursor.fetchall())
        seen.append((" ".join(words), plan))

    engines = {engine, db.writer_engine(engine)}
    for one in engines:
        event.listen(one, "before_cursor_execute", explain)
    yield seen
    for one in engines:
        event.remove(one, "before_cursor_execute", explain)


def _assert_no_subplan_per_job(session: Session, plans: list[tuple[str, str]]) -> None:
    assert plans, "no statement read the manifest's keys"
    pg = session.get_bind().dialect.name == "postgresql"
    for statement, plan in plans:
        if pg:
            assert "SubPlan" not in plan, f"{statement[:120]}\n{plan}"
        else:
            correlated = [line for line in plan.splitlines() if "CORRELATED" in line]
            scans = [line for line in plan.splitlines() if line.startswith("SCAN wanbatch_")]
            assert not (correlated and scans), f"{statement[:120]}\n{plan}"


def _resubmit(session: Session, batch_id: str, keep: range) -> store.Resubmitted:
    done = store.resubmit_jobs(session, batch_id, [_job(i) for i in keep], lambda: (len(keep) + 1) // 2)
    session.commit()
    return done


def test_a_resubmit_finds_the_left_out_jobs_by_an_anti_join_not_a_subplan_per_job(
    session: Session, plans: list[tuple[str, str]]
) -> None:
    batch, _ = store.get_or_create_batch(
        session, name="plans", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(session, batch.id, [_job(i) for i in range(600)])
    session.commit()

    left_out = _resubmit(session, batch.id, range(400))  # 200 left out, all never sent: dropped
    assert (left_out.not_in_manifest, left_out.dropped, left_out.restored) == (200, 200, 0)
    again = _resubmit(session, batch.id, range(500))  # 100 of them back, 100 still left out
    assert (again.not_in_manifest, again.dropped, again.restored) == (100, 100, 100)
    stood = dict(
        session.execute(
            select(Job.state, func.count()).where(Job.batch_id == batch.id).group_by(Job.state)
        ).all()
    )
    assert stood == {S.PENDING: 500, S.CANCELLED: 100}

    assert plans, "no statement read the manifest's keys"
    pg = session.get_bind().dialect.name == "postgresql"
    for statement, plan in plans:
        if pg:
            # A NOT IN (or any sublink not pulled up into a join) is a filter running a subplan
            # for each job; hashed or not, it is never an anti-join.
            assert "SubPlan" not in plan, f"{statement[:120]}\n{plan}"
        else:
            # SQLite: a subquery over the keys is run once (a LIST SUBQUERY, an index of its own)
            # or searched by the temporary table's primary key, never scanned for each job.
            correlated = [line for line in plan.splitlines() if "CORRELATED" in line]
            scans = [line for line in plan.splitlines() if line.startswith("SCAN wanbatch_")]
            assert not (correlated and scans), f"{statement[:120]}\n{plan}"
    if pg:
        # The left-out jobs are found once per resubmit, by an anti-join on the keys.
        assert sum("Anti Join" in plan for _, plan in plans) == 2, "\n\n".join(plan for _, plan in plans)


def _seeded(i: int, *, written: bool) -> store.NewJob:
    """Job ``i`` with its seed pinned, ``num_frames: 81`` (the endpoint's default) written or not."""
    from jobs.endpoints import get_endpoint
    from jobs.manifest import job_key

    given: dict[str, Any] = {"prompt": f"job {i}", "seed": i, **({"num_frames": 81} if written else {})}
    return store.NewJob(
        key=job_key(get_endpoint("fal-ai/wan-22"), given),
        item_index=i,
        endpoint="fal-ai/wan-22",
        input=given,
        est_billing_units=Decimal(1),
        est_usd=Decimal("0.40"),
    )


def test_jobs_standing_for_another_spelling_are_found_without_a_subplan_per_job(
    session: Session, plans: list[tuple[str, str]]
) -> None:
    """The statements that find the jobs sent under another spelling of the manifest's
    (``manifest_key``): no subplan per job, on the resubmit that matches them nor on those after."""
    batch, _ = store.get_or_create_batch(
        session, name="plans-wd", manifest_path="/m.yaml", manifest_sha256="0" * 64, budget_max_usd=None
    )
    store.add_jobs(session, batch.id, [_seeded(i, written=False) for i in range(300)])
    session.execute(
        update(Job)
        .where(Job.batch_id == batch.id)
        .values(state=S.SUCCEEDED, attempts=1, request_id="r", actual_usd=Decimal("0.4"))
    )
    session.commit()

    def resubmit(jobs: list[store.NewJob]) -> store.Resubmitted:
        done = store.resubmit_jobs(session, batch.id, jobs, lambda: len(jobs), chunk=100)
        session.commit()
        return done

    first = resubmit([_seeded(i, written=True) for i in range(200)])
    assert (first.added, first.defaults_matched, first.not_in_manifest) == (0, 200, 100)
    again = resubmit([_seeded(i, written=True) for i in range(250)])  # 200 found by it, 50 matched
    assert (again.added, again.defaults_matched, again.not_in_manifest) == (0, 250, 50)
    both = resubmit([_seeded(i, written=True) for i in range(250)] + [_seeded(0, written=False)])
    assert (both.added, both.defaults_matched, both.not_in_manifest) == (1, 249, 50)
    _assert_no_subplan_per_job(session, plans)
